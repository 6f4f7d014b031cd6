"""``search_split``: its own messages, the number of classes, and the evaluation transform of the upper part."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms

from lightning_autobalance.data import search_split
from lightning_autobalance.data.search_split import dataset_targets


class Images(Dataset):
    """A torchvision-shaped dataset: ``targets``, ``classes`` and a ``transform`` applied in ``__getitem__``."""

    def __init__(self, counts, transform=None, classes=None):
        self.targets = [c for c, n in enumerate(counts) for _ in range(n)]
        self.data = torch.arange(len(self.targets) * 3 * 8 * 8, dtype=torch.float32).reshape(-1, 3, 8, 8)
        self.transform = transform
        self.classes = classes if classes is not None else [f"c{i}" for i in range(len(counts))]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.data[i]
        return (self.transform(x) if self.transform is not None else x), self.targets[i]


def test_messages_name_its_own_arguments():
    data = TensorDataset(torch.zeros(13, 2), torch.tensor([0] * 10 + [1] * 2 + [2]))
    with pytest.raises(ValueError, match=r"search_split needs at least 2 samples of every class \(one for each "
                                         r"part\); classes with fewer: \{2: 1\}") as info:
        search_split(data)
    assert "min_count" not in str(info.value) and "disable" not in str(info.value)
    with pytest.raises(ValueError, match=r"search_split: fraction must be a number in the open interval \(0, 1\)"):
        search_split(data, fraction=1.0)
    with pytest.raises(ValueError, match=r"search_split: num_classes must be a positive integer"):
        search_split(data, num_classes=0)
    with pytest.raises(ValueError, match=r"search_split: upper_transform must be 'auto', a callable or None"):
        search_split(data, upper_transform="eval")


def test_a_missing_class_is_an_error_that_mentions_num_classes():
    labels = torch.tensor([0] * 10 + [2] * 4)  # class 1 absent
    with pytest.raises(ValueError, match=r"no sample of classes \[1\] \(3 classes from the largest label plus one\).*"
                                         r"pass the real number as num_classes="):
        search_split(labels)
    # the last class absent: found from num_classes, or from the dataset's `classes` (also under a Subset)
    with pytest.raises(ValueError, match=r"no sample of classes \[3\] \(4 classes from num_classes=4\)"):
        search_split(torch.tensor([0] * 10 + [1] * 4 + [2] * 3), num_classes=4)
    images = Images([10, 4, 3, 2])
    tail_less = Subset(images, list(range(17)))  # the last class's two images left out
    with pytest.raises(ValueError, match=r"no sample of classes \[3\] \(4 classes from the dataset's `classes`"):
        search_split(tail_less)
    with pytest.raises(ValueError, match=r"labels run from 0 to 3, outside \[0, 3\) for num_classes=3"):
        search_split(images, num_classes=3)


def test_the_upper_part_gets_the_evaluation_transform_by_default():
    train_tf = transforms.Compose([transforms.RandomHorizontalFlip(p=1.0), transforms.Normalize([0.0] * 3, [2.0] * 3)])
    images = Images([10, 5, 3], transform=train_tf)
    lower, upper, counts, _ = search_split(images, seed=0)
    i = upper.indices[0]
    raw = images.data[i]
    torch.testing.assert_close(upper[0][0], raw / 2)  # normalised, not flipped
    torch.testing.assert_close(lower[0][0], torch.flip(images.data[lower.indices[0]], dims=[-1]) / 2)
    assert images.transform is train_tf and len(train_tf.transforms) == 2  # the user's dataset is untouched
    assert upper.targets == [images.targets[j] for j in upper.indices] and counts == [8, 4, 2]
    # through a Subset chain (e.g. random_split) too
    sub = Subset(images, list(range(len(images))))
    _, upper_sub, _, _ = search_split(sub, seed=0)
    torch.testing.assert_close(upper_sub[0][0], images.data[sub.indices[upper_sub.indices[0]]] / 2)


def test_the_training_transform_is_kept_with_a_warning_when_leaving_augmentation_out_is_not_safe():
    resized = transforms.Compose([transforms.RandomResizedCrop(4, antialias=True)])  # also sets the size
    images = Images([10, 5, 3], transform=resized)
    with pytest.warns(UserWarning, match=r"the upper part keeps the dataset's random training transform \(without "
                                         r"its random steps the transform gives inputs of another shape\); pass "
                                         r"upper_transform=<your evaluation transform>"):
        _, upper, _, _ = search_split(images)
    assert upper.dataset is images and tuple(upper[0][0].shape) == (3, 4, 4)


def test_an_explicit_evaluation_transform_or_none():
    images = Images([10, 5, 3], transform=transforms.RandomHorizontalFlip(p=1.0))
    _, upper, _, _ = search_split(images, upper_transform=lambda x: x + 1)
    torch.testing.assert_close(upper[0][0], images.data[upper.indices[0]] + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, kept, _, _ = search_split(images, upper_transform=None)
    assert kept.dataset is images
    with pytest.raises(ValueError, match=r"upper_transform was given, but the dataset \(TensorDataset\) has no "
                                         r"`transform`"):
        search_split(TensorDataset(torch.zeros(6, 1), torch.tensor([0, 0, 0, 1, 1, 1])), upper_transform=abs)


def test_dataset_targets_without_reading_samples():
    class NoTargets(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(1), i % 2

    assert dataset_targets(NoTargets(), read=False) is None
    assert dataset_targets(Subset(NoTargets(), [1, 2]), read=False) is None
    assert dataset_targets(Subset(NoTargets(), [1, 2])).tolist() == [1, 0]
