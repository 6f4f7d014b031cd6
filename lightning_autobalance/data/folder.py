"""Long-tailed datamodule over image files: an ImageFolder tree or ImageNet-LT-style lists."""

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_autobalance.data import profiles, transforms
from lightning_autobalance.data._checks import check_bool, check_int
from lightning_autobalance.data.base import LongTailDataModule
from lightning_autobalance.data.file_dataset import ImageFileDataset, bad_images, decode_image
from lightning_autobalance.data.memory_dataset import InMemoryImageDataset

__all__ = ["LongTailImageFolder"]


class LongTailImageFolder(LongTailDataModule):
    """Long-tailed training data read from image files.

    Two layouts:

    * **Folder tree** (``train_list=None``): ``root/train/<class>/<image>`` and ``root/test/<class>/<image>`` as
      ``torchvision.datasets.ImageFolder`` reads them: classes are the sorted subfolder names, and within a class the
      files are in ImageFolder's order (sorted by path, so by file name in a flat folder). The training set is
      long-tailed with the profile and ``n_max`` (default: the largest class), using the same seeded per-class choice of
      positions as :class:`LongTailCIFAR10`; on the CIFAR-10 JPEG copy (files numbered in the release's order) it gives
      the same 12,406 images as CIFAR-10-LT from the binary release.
    * **List files** (ImageNet-LT style): ``train_list`` and ``test_list`` name text files of
      ``<relative/path> <label>`` lines, paths relative to ``root``; blank lines and lines starting with ``#`` are
      skipped. A list file is looked up as given, then relative to ``root``. Labels run from 0 to the largest training
      label. Class names are the image's parent folder (when each class has one folder of its own), else the label. The
      ImageNet-LT lists are long-tailed already: set ``already_long_tailed=True``.

    Transforms: with ``image_size=None`` images are decoded at 32x32 (``cifar_size``; resized when they differ) and get
    CIFAR-style augmentation (``RandomCrop(32, padding=4)``, flip, CIFAR-10 mean/std); with an integer,
    ``RandomResizedCrop(image_size)`` and flip for training, ``Resize(int(image_size * 256 / 224))`` and
    ``CenterCrop(image_size)`` for evaluation, ImageNet mean/std.

    Images are decoded lazily with PIL, item by item; ``cache_in_memory=True`` decodes each
    used image once (when the datasets are built) into ``uint8`` tensors and keeps them.

    Args:
        root: Dataset root folder.
        train_list: Training list file (list mode), or None for the folder tree.
        test_list: Test list file (list mode only).
        n_max: Count of class 0 in the profile; None means the largest training class.
        already_long_tailed: Keep the training data's own counts.
        image_size: None for 32x32 CIFAR-style data, else the side of the ImageNet-style crop.
        cifar_size: With ``image_size=None``, the side of the CIFAR-style images: every image is
            decoded and resized (PIL bilinear, antialiased) to ``cifar_size x cifar_size`` and
            augmented with ``RandomCrop(cifar_size, padding=max(1, cifar_size // 8))`` and flip
            (32: the usual 32x32 with padding 4; e.g. 16 for a fast CPU benchmark at 16x16).
        train_augment: Whether training images get the random augmentation (crop and flip, or the
            resized crop); False trains on the images as they are, which fits the training set
            quickly (a terminal-phase benchmark). The upper part follows it (and ``upper_augment``).
        cache_in_memory: Decode once and keep the images in memory.
        verify_images: Check, when the counts are first read (before any training), that every image the run uses is
            one: it opens as an image, passes PIL's ``verify()``, and a JPEG decodes at 1/8 scale (which finds one cut
            short); in parallel threads, each file once per process. A bad file (corrupt, truncated, not an image
            despite its suffix) is named then, by path, rather than when its batch is read.
        **kwargs: The arguments of :class:`~lightning_autobalance.data.LongTailDataModule` (``imbalance_ratio``,
            ``search_split``, ``batch_size``, ``seed``, ...), with its defaults; ``device_resident`` only with
            ``image_size=None`` (the images are then decoded once, as with ``cache_in_memory``).

    Raises:
        ValueError: At construction, a bad argument. When the counts are first computed: a folder without class
            subfolders, a class folder without images, a malformed list line or a label out of range (naming the file
            and line), a class with fewer images than the profile asks for.
        FileNotFoundError: (idem) a missing folder, list file or listed image.
        RuntimeError: An image that cannot be used (naming the file): when the counts are first
            read with ``verify_images``, else when it is decoded.

    Example:
        >>> dm = LongTailImageFolder("~/.cache/lightning-autobalance/cifar10-jpeg")  # doctest: +SKIP
        >>> sum(dm.class_counts)  # doctest: +SKIP
        12406
    """

    def __init__(self, root: str, train_list: str | None = None, test_list: str | None = None, n_max: int | None = None,
                 already_long_tailed: bool = False, image_size: int | None = None, cifar_size: int = 32,
                 train_augment: bool = True, cache_in_memory: bool = False, verify_images: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(root, str | os.PathLike) or not str(root):
            raise ValueError(f"root must be a non-empty folder path, got {root!r}")
        for name, value in (("train_list", train_list), ("test_list", test_list)):
            if value is not None and (not isinstance(value, str | os.PathLike) or not str(value)):
                raise ValueError(f"{name} must be a file path or None, got {value!r}")
        if test_list is not None and train_list is None:
            raise ValueError("test_list needs train_list (list mode); the folder tree reads root/test instead")
        self.root = os.path.expanduser(str(root))
        self.train_list = None if train_list is None else os.path.expanduser(str(train_list))
        self.test_list = None if test_list is None else os.path.expanduser(str(test_list))
        self.n_max = check_int("n_max", n_max, 1, allow_none=True)
        self.already_long_tailed = check_bool("already_long_tailed", already_long_tailed)
        if self.already_long_tailed and self.n_max is not None:
            raise ValueError("n_max must be None with already_long_tailed=True (the data's own counts are used)")
        self.image_size = check_int("image_size", image_size, 1, allow_none=True)
        self.cifar_size = check_int("cifar_size", cifar_size, 2)
        if self.image_size is not None and self.cifar_size != 32:
            raise ValueError(f"cifar_size applies to CIFAR-style data (image_size=None) only; got cifar_size="
                             f"{self.cifar_size} with image_size={self.image_size}")
        self.train_augment = check_bool("train_augment", train_augment)
        self.cache_in_memory = check_bool("cache_in_memory", cache_in_memory)
        self.verify_images = check_bool("verify_images", verify_images)
        if self.device_resident and self.image_size is not None:
            raise ValueError(f"device_resident=True needs image_size=None (32x32 images, all of one size, CIFAR "
                             f"augmentation); got image_size={self.image_size}, whose random resized crops are drawn "
                             "per image on the host")
        #: Decode once and keep: asked for, or needed to hold the images on the device.
        self._in_memory = self.cache_in_memory or self.device_resident
        if self.train_list is not None and self.test_list is None and self.val_source == "test":
            raise ValueError("val_source='test' needs test_list in list mode; give test_list or choose val_source "
                             "'upper' or 'none'")
        self._train_paths: list[str] = []
        self._names: list[str] = []
        self._test_files: tuple[list[str], np.ndarray] | None = None
        self._cache: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ reading the layout
    @property
    def list_mode(self) -> bool:
        """Whether the data come from list files rather than a folder tree."""
        return self.train_list is not None

    def _scan_tree(self, split: str) -> tuple[list[str], np.ndarray, list[str]]:
        """Image paths, labels and class names of ``root/<split>/<class>/...``."""
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root '{self.root}' does not exist")
        base = os.path.join(self.root, split)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"folder '{base}' not found: LongTailImageFolder expects "
                                    f"root/{split}/<class>/<image> (ImageFolder layout), or list files given as "
                                    "train_list/test_list")
        classes = sorted(entry.name for entry in os.scandir(base) if entry.is_dir())
        if not classes:
            raise ValueError(f"folder '{base}' has no class subfolders (expected {base}/<class>/<image>)")
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            folder = os.path.join(base, name)
            files = [
                os.path.join(dirpath, fname)
                for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True))
                for fname in sorted(fnames)
                if fname.lower().endswith(IMG_EXTENSIONS)
            ]
            if not files:
                raise ValueError(f"class folder '{folder}' has no image files (extensions {', '.join(IMG_EXTENSIONS)})")
            paths += files
            labels += [label] * len(files)
        return paths, np.asarray(labels, dtype=np.int64), classes

    def _resolve_list(self, list_file: str, name: str) -> str:
        if os.path.isfile(list_file):
            return list_file
        under_root = os.path.join(self.root, list_file)
        if not os.path.isabs(list_file) and os.path.isfile(under_root):
            return under_root
        raise FileNotFoundError(f"{name} file '{list_file}' not found (also looked for '{under_root}')")

    def _read_list(self, list_file: str, name: str, num_classes: int | None) -> tuple[list[str], np.ndarray]:
        """Paths and labels of a ``<relative/path> <label>`` list file; checks every line."""
        path = self._resolve_list(list_file, name)
        paths: list[str] = []
        labels: list[int] = []
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(maxsplit=1)
                try:
                    if len(parts) != 2:
                        raise ValueError
                    label = int(parts[1])
                except ValueError:
                    raise ValueError(f"{name} '{path}', line {number}: expected '<relative/path> <integer label>', got "
                                     f"{line!r}") from None
                if label < 0 or (num_classes is not None and label >= num_classes):
                    expected = "a label >= 0" if num_classes is None else f"a label in 0..{num_classes - 1}"
                    raise ValueError(f"{name} '{path}', line {number}: expected {expected}, got {label}")
                image = os.path.join(self.root, parts[0])
                if not os.path.isfile(image):
                    raise FileNotFoundError(f"{name} '{path}', line {number}: image file '{image}' not found")
                paths.append(image)
                labels.append(label)
        if not paths:
            raise ValueError(f"{name} '{path}' lists no images")
        return paths, np.asarray(labels, dtype=np.int64)

    @staticmethod
    def _list_class_names(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
        """Parent folder of each class's images when it is one folder per class, else the label."""
        folders: dict[int, set[str]] = {}
        for path, label in zip(paths, labels.tolist()):
            folders.setdefault(label, set()).add(os.path.basename(os.path.dirname(path)))
        names = [next(iter(folders[c])) if len(folders.get(c, ())) == 1 else "" for c in range(num_classes)]
        if "" in names or len(set(names)) != num_classes:
            return [str(c) for c in range(num_classes)]
        return names

    def _load_pool(self) -> tuple[np.ndarray, list[str]]:
        if self.train_list is not None:
            paths, labels = self._read_list(self.train_list, "train_list", None)
            num_classes = int(labels.max()) + 1
            missing = sorted(set(range(num_classes)) - set(labels.tolist()))
            if missing:
                path = self._resolve_list(self.train_list, "train_list")
                raise ValueError(f"train_list '{path}': the labels run up to {num_classes - 1} (e.g. "
                                 f"'{paths[int(labels.argmax())]}') but no line has the labels "
                                 f"{missing[:10]}{'...' if len(missing) > 10 else ''}: labels must run from 0 to K-1 "
                                 "with at least one training image per class")
            names = self._list_class_names(paths, labels, num_classes)
        else:
            paths, labels, names = self._scan_tree("train")
        self._train_paths, self._names = paths, names
        if self.val_source == "test":  # validation reads the test set: find its errors now
            self._test_split()
        return labels, names

    def data_files(self) -> list[str]:
        """Every training image file and every test image file (the test set is read when asked for)."""
        self._ensure_plan()
        return [*self._train_paths, *self._test_split()[0]]

    def _test_split(self) -> tuple[list[str], np.ndarray]:
        if self._test_files is None:
            if self.test_list is not None:
                self._test_files = self._read_list(self.test_list, "test_list", len(self._names))
            elif self.train_list is not None:
                raise RuntimeError("no test data: LongTailImageFolder in list mode needs test_list for testing")
            else:
                paths, labels, classes = self._scan_tree("test")
                if classes != self._names:
                    raise ValueError(f"the class folders of '{os.path.join(self.root, 'test')}' ({classes}) differ "
                                     f"from those of '{os.path.join(self.root, 'train')}' ({self._names})")
                self._test_files = (paths, labels)
        return self._test_files

    def _profile_counts(self, pool_counts: list[int]) -> list[int] | None:
        if self.already_long_tailed:
            return None
        n_max = self.n_max if self.n_max is not None else max(pool_counts)
        counts = profiles.long_tail_counts(n_max, len(pool_counts), self.imbalance_ratio, self.profile,
                                           self.step_fraction, self.min_count)
        for c, (have, want) in enumerate(zip(pool_counts, counts)):
            if have < want:
                raise ValueError(f"class {c} ({self._names[c]!r}) has {have} training images but the profile asks for "
                                 f"{want} (n_max={n_max}, imbalance_ratio={self.imbalance_ratio:g}); lower n_max, or "
                                 "set already_long_tailed=True to use the data's own counts")
        return counts

    # ------------------------------------------------------------------ datasets
    def _transform(self, train: bool) -> Any:
        train = train and self.train_augment
        if self.image_size is None:
            return transforms.cifar_transform(transforms.CIFAR10_MEAN, transforms.CIFAR10_STD, train=train,
                                              size=self.cifar_size, padding=max(1, self.cifar_size // 8))
        return transforms.imagenet_transform(self.image_size, train=train)

    @property
    def _decode_size(self) -> tuple[int, int] | None:
        return (self.cifar_size, self.cifar_size) if self.image_size is None else None

    def _stacked(self, images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Decoded images as one tensor when they share the CIFAR-style size, else as they are."""
        if self.image_size is None:
            side = self.cifar_size
            return torch.stack(images) if images else torch.empty(0, 3, side, side, dtype=torch.uint8)
        return images

    def _ensure_plan(self) -> None:
        """The plan, then (once) the check of every image it uses (see ``verify_images``): a bad file is named when
        the counts are first read, before any training."""
        first = self._kept is None
        super()._ensure_plan()
        if first and self._kept is not None:
            try:
                self._verify([self._train_paths[i] for i in self._kept.tolist()], "training")
                if self._test_files is not None:  # read already: validation uses the test set
                    self._verify(self._test_files[0], "test")
            except RuntimeError:
                self._kept = None  # a later access checks again rather than going on with the bad files
                raise

    def _verify(self, paths: list[str], what: str) -> None:
        """Checks every file as an image (:func:`~lightning_autobalance.data.file_dataset.check_image`), in
        threads; names the bad ones."""
        if not self.verify_images:
            return
        bad = bad_images(paths)
        if bad:
            raise RuntimeError(f"LongTailImageFolder: {len(bad)} of the {len(paths)} {what} images cannot be opened: "
                               f"{'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}. Fix or remove them (or pass "
                               "verify_images=False to skip this check)")

    def _build_dataset(self, indices: np.ndarray, augment: bool) -> Dataset[Any]:
        self._ensure_plan()  # which checked every image the run trains on
        assert self._pool_targets is not None and self._kept is not None
        targets = self._pool_targets[indices]
        if not self._in_memory:
            paths = [self._train_paths[i] for i in indices.tolist()]
            return ImageFileDataset(paths, targets, self._transform(augment), self._decode_size)
        for i in indices.tolist():
            if i not in self._cache:
                self._cache[i] = decode_image(self._train_paths[i], self._decode_size)
        images = self._stacked([self._cache[i] for i in indices.tolist()])
        return InMemoryImageDataset(images, targets, self._transform(augment))

    def _build_test_dataset(self) -> Dataset[Any]:
        self._ensure_plan()
        paths, labels = self._test_split()
        self._verify(paths, "test")
        if self._in_memory:
            images = self._stacked([decode_image(path, self._decode_size) for path in paths])
            return InMemoryImageDataset(images, labels, self._transform(False))
        return ImageFileDataset(paths, labels, self._transform(False), self._decode_size)
