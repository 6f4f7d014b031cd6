"""The searched augmentation travels with the loss: ``export_loss`` writes it, ``configure_autobalance(loss_file=...)``,
``load_loss`` and the pipeline's retraining classifier rebuild it (frozen with the loss) on their own class counts, so
that ``autobalance_augment`` applies the strengths found; files without it load as before, files whose augmentation
does not fit are refused by field."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import linear_module

from lightning_autobalance import AutoBalanceMixin, ImbalancedClassifier
from lightning_autobalance.core.augment import augment
from lightning_autobalance.runner.pipeline import _clone

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [40, 12, 4]
Linear = linear_module(AutoBalanceMixin, pl.LightningModule, in_features=6)
NOISE = {"ops": "noise+erase", "gated": "noise"}


def searched(kind: str = "class", counts=COUNTS, seed: int = 0) -> pl.LightningModule:
    """A module whose augmentation was 'searched': its free values set to distinct numbers."""
    model = Linear(counts, search=("offset", "augment"))
    aug = model.configure_augment(NOISE, parametrization=kind, seed=5)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in [*aug.alpha().values(), *model.autobalance_parameters().alpha().values()]:
            value.copy_(0.5 * torch.randn(value.shape, generator=gen, dtype=torch.float64))
    return model


def strengths(model) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in model.autobalance_augment_parameters().strengths().items()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)


def test_export_writes_the_augmentation_and_a_frozen_retraining_applies_its_strengths_on_other_counts(tmp_path):
    found = searched("class")
    path = found.export_loss(tmp_path / "found.yaml")
    doc = yaml.safe_load(path.read_text())
    section = doc["augmentation"]
    assert section["kind"] == "class" and section["seed"] == 5 and section["tables"] == ["erase", "noise", "p_noise"]
    assert section["num_classes"] == 3 and section["num_groups"] == 1 and section["class_counts"] == COUNTS
    for name, table in strengths(found).items():  # the per-cell strengths, for a reader
        torch.testing.assert_close(torch.tensor(section["strengths"][name], dtype=torch.float64), table)

    other = [90, 20, 6]  # retrained on the whole set: other counts
    retrained = Linear(other, search=("offset",), loss_file=str(path), freeze=True)  # "augment" not even named
    aug = retrained.autobalance_augment_parameters()
    assert aug is not None and aug.frozen and aug.seed == 5
    assert aug.class_counts[0].tolist() == other
    assert_same(strengths(retrained), strengths(found))

    retrained.train()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])
    out = retrained.autobalance_augment(x, y)
    draws = aug.__class__(torch.tensor(other), NOISE, "class", seed=5).next_draws(x.shape, x.device)  # the same draw
    expected = augment(x, y, None, {k: v.double() for k, v in found.autobalance_augment_parameters().tables().items()},
                       draws, aug.settings)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out, x)


def test_a_hierarchical_augmentation_follows_the_counts_like_the_loss(tmp_path):
    found = searched("hierarchical")
    path = found.export_loss(tmp_path / "found.json")
    same_shape = Linear([80, 24, 8], loss_file=str(path), freeze=True)  # proportional: the same log-ratios
    assert_same(strengths(same_shape), strengths(found))
    steeper = Linear([400, 24, 2], loss_file=str(path), freeze=True)  # the slope now runs along other log-ratios
    assert not torch.allclose(strengths(steeper)["noise"], strengths(found)["noise"])
    aug, ref = steeper.autobalance_augment_parameters(), found.autobalance_augment_parameters()
    for name, value in ref.alpha().items():  # the searched deviations themselves are the ones found
        assert torch.equal(aug.alpha()[name], value)


def test_load_loss_replaces_the_augmentation_and_freezes_it_with_the_loss(tmp_path):
    path = searched("class").export_loss(tmp_path / "found.yaml")
    plain = Linear([70, 15, 5])  # no augmentation at all
    assert plain.autobalance_augment_parameters() is None
    plain.load_loss(path)
    assert plain.loss_frozen and plain.autobalance_augment_parameters().frozen
    assert_same(strengths(plain), strengths(searched("class")))

    searching = Linear(COUNTS, search=("offset", "augment"))
    searching.load_loss(path, freeze=False)  # unfrozen: the search goes on from the values found
    assert not searching.autobalance_augment_parameters().frozen
    searching.configure_augment(NOISE, parametrization="class", seed=5)  # the file's augmentation stays
    assert_same(strengths(searching), strengths(searched("class")))


def test_a_file_without_an_augmentation_loads_as_before(tmp_path):
    path = Linear(COUNTS).export_loss(tmp_path / "old.yaml")
    assert "augmentation" not in yaml.safe_load(path.read_text())
    model = Linear(COUNTS, search=("offset", "augment"), loss_file=str(path), freeze=True)
    aug = model.autobalance_augment_parameters()  # built from the settings, at the start strengths, frozen
    assert aug.frozen and all(float(v.abs().sum()) == 0.0 for v in aug.alpha().values())
    assert Linear(COUNTS, loss_file=str(path), freeze=True).autobalance_augment_parameters() is None
    searching = searched("class")
    before = strengths(searching)
    searching.load_loss(path)  # the module's own augmentation is left as it is
    assert_same(strengths(searching), before)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tables", ["noise"], "augmentation.tables lists"),
    ("num_classes", 4, "augmentation.num_classes is 4.*expected num_classes: 3"),
    ("num_groups", 2, "augmentation.num_groups is 2.*expected num_groups: 1"),
    ("kind", "cells", "augmentation.kind is 'cells'"),
    ("settings", {"ops": "rotate"}, "augmentation.settings"),
    ("alpha", {"augment_noise": [[0.0, 0.0, 0.0]]}, "augmentation.alpha holds"),
])
def test_an_augmentation_that_does_not_fit_is_refused_by_field(tmp_path, field, value, message):
    path = searched("class").export_loss(tmp_path / "found.yaml")
    doc = yaml.safe_load(path.read_text())
    doc["augmentation"][field] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ValueError, match=message):
        Linear(COUNTS, loss_file=str(path), freeze=True)
    with pytest.raises(ValueError, match=message):
        Linear(COUNTS).load_loss(path)


def test_a_free_value_of_the_wrong_shape_is_refused(tmp_path):
    path = searched("class").export_loss(tmp_path / "found.yaml")
    doc = yaml.safe_load(path.read_text())
    doc["augmentation"]["alpha"]["augment_noise"] = [[0.0, 0.0]]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ValueError, match=r"augmentation.alpha.augment_noise has shape \(1, 2\); expected \(1, 3\)"):
        Linear(COUNTS).load_loss(path)


def test_the_pipelines_retraining_classifier_applies_the_found_strengths(tmp_path):
    settings = {"ops": "flip+shift+noise", "parametrization": "class", "seed": 2}
    template = ImbalancedClassifier("digits_net", num_classes=3, class_counts=COUNTS, search=("offset", "augment"),
                                    augmentation=settings)
    search_model = _clone(template, class_counts=[32, 10, 3])  # the search stage, on its split
    aug = search_model.autobalance_augment_parameters()
    with torch.no_grad():
        aug.free_shift.copy_(torch.tensor([[-2.0, 0.5, 2.0]]))
        aug.free_noise.copy_(torch.tensor([[1.0, -1.0, 0.0]]))
    found = search_model.export_loss(tmp_path / "found_loss.yaml")
    # the retraining stage as run_pipeline builds it: the template with the found loss, frozen, on the whole counts
    retrained = _clone(template, class_counts=COUNTS, loss="autobalance", loss_file=str(found), freeze_loss=True)
    ra = retrained.autobalance_augment_parameters()
    assert ra.frozen and retrained.loss_frozen
    assert_same(strengths(retrained), strengths(search_model))
    retrained.train()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    start = _clone(template, class_counts=COUNTS)  # what retraining applied before: the start strengths
    start.train()
    assert not torch.allclose(retrained.autobalance_augment(x, y), start.autobalance_augment(x, y))


@pytest.mark.parametrize("freeze", [False, True])
def test_autobalance_like_copies_the_augmentation_with_the_loss(freeze):
    found = searched("class")
    swa = Linear(COUNTS)  # a module built around another's network: the default loss, no augmentation
    assert swa.autobalance_augment_parameters() is None
    swa.autobalance_like(found, freeze=freeze)
    aug = swa.autobalance_augment_parameters()
    assert aug is not None and aug is not found.autobalance_augment_parameters() and aug.frozen == freeze
    assert_same(strengths(swa), strengths(found))
    with torch.no_grad():  # a copy: moving the source's values leaves it alone
        found.autobalance_augment_parameters().alpha()["augment_noise"].add_(1.0)
    assert not torch.equal(strengths(swa)["noise"], strengths(found)["noise"])

    plain = Linear(COUNTS)  # a source without an augmentation takes away the copy's
    swa.autobalance_like(plain)
    assert swa.autobalance_augment_parameters() is None
