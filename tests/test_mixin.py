"""``AutoBalanceMixin`` inside a real ``pytorch_lightning.Trainer`` on CPU (tiny synthetic imbalanced data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_autobalance.core.losses import AdjustedCrossEntropy
from lightning_autobalance.core.parametrization import DatasetDependent, FrequencyGroups, PerClass
from lightning_autobalance.lightning.mixin import AutoBalanceMixin, unpack_batch

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*`training_step` returned.*"),
]

COUNTS = [40, 16, 8]
K = len(COUNTS)
D = 4
ALL = ("delta", "offset", "weight")


class Net(AutoBalanceMixin, pl.LightningModule):
    def __init__(self, counts=COUNTS, configure: bool = True, **autobalance):
        super().__init__()
        k = len(counts[0]) if isinstance(counts[0], (list, tuple)) else len(counts)
        self.layer = nn.Linear(D, k)
        if configure:
            self.configure_autobalance(counts, **autobalance)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y, g = self.autobalance_unpack(batch)
        return self.autobalance_loss(self.autobalance_forward(x), y, g)

    def configure_optimizers(self):
        # every nn.Parameter, momentum and weight decay: alpha would move if it were among them
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def _data(counts=COUNTS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    x = torch.randn(len(y), D, generator=gen) + 2.0 * F.one_hot(y, D).float()
    return x, y


def _loader(counts=COUNTS):
    x, y = _data(counts)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


def _fit(model, loader, steps: int = 3, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, loader)
    assert trainer.global_step == steps
    return trainer


def _randomize(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.autobalance.alpha().values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.5 + (0.3 if t.ndim == 0 else 0.0))


def _batch(seed: int = 1, n: int = 12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, generator=gen, dtype=dtype) * 2
    target = torch.arange(n) % K
    return logits, target


def _ref_loss(logits, target, delta, offset, weight, reduction="mean"):
    """w_y * CE(delta * f + offset, y) written out (one group row)."""
    z = delta[0].double() * logits.double() + offset[0].double()
    nll = torch.logsumexp(z, dim=1) - z[torch.arange(len(target)), target]
    w_y = weight[0].double()[target]
    return (w_y * nll).sum() / (w_y.sum() if reduction == "weighted_mean" else len(target))


# ---------------------------------------------------------------- alpha is state, not a parameter


def test_loss_parameters_are_state_not_parameters():
    torch.manual_seed(0)
    model = Net(preset="la", search=ALL, parametrization="class")
    assert [n for n, _ in model.named_parameters()] == ["layer.weight", "layer.bias"]
    alpha_ids = {id(t) for t in model.autobalance.alpha().values()}
    assert len(alpha_ids) == 3
    assert alpha_ids.isdisjoint(id(p) for p in model.parameters())
    sd = model.state_dict()
    for key in ("alpha_delta", "alpha_offset", "alpha_weight", "base_delta", "base_offset", "base_weight",
                "class_counts", "_extra_state"):
        assert f"autobalance.{key}" in sd
    weight_before = model.layer.weight.detach().clone()

    trainer = _fit(model, _loader())
    grouped = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert alpha_ids.isdisjoint(id(p) for p in grouped)
    # SGD with momentum and weight decay stepped the weights but never touched alpha
    assert not torch.allclose(model.layer.weight, weight_before)
    assert all(bool((t == 0).all()) for t in model.autobalance.alpha().values())
    # the training loss is logit adjustment: CE(f + log pi)
    x, y = _data()
    with torch.no_grad():
        f = model(x)
        pi = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
        torch.testing.assert_close(model.autobalance_loss(f, y), F.cross_entropy(f + torch.log(pi), y))


# ---------------------------------------------------------------- weights-only checkpoint


@pytest.mark.parametrize(("kind", "search"), [("class", ALL), ("groups", ("offset", "weight")), ("dataset", ALL)])
def test_weights_only_checkpoint_restores_the_loss(tmp_path, kind, search):
    torch.manual_seed(1)
    kwargs = {"preset": "vs", "search": search, "parametrization": kind, "group_size": 2}
    model = Net(**kwargs)
    trainer = _fit(model, _loader(), steps=2)
    _randomize(model, seed=3)
    model.freeze_loss()
    path = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    ckpt = torch.load(path, weights_only=False)
    assert "optimizer_states" not in ckpt

    logits, target = _batch()
    x, y = _data()
    fresh = Net(**kwargs)
    assert not fresh.loss_frozen
    assert not torch.allclose(fresh.autobalance_loss(logits, target), model.autobalance_loss(logits, target))
    fresh.load_state_dict(ckpt["state_dict"])
    assert fresh.loss_frozen
    for name, value in model.autobalance.alpha().items():
        torch.testing.assert_close(fresh.autobalance.alpha()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(fresh.autobalance_loss(logits, target), model.autobalance_loss(logits, target),
                               rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh.autobalance_loss(fresh(x), y), model.autobalance_loss(model(x), y),
                                   rtol=0, atol=0)


# ---------------------------------------------------------------- export / load


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_export_and_load_loss_round_trip(tmp_path, suffix):
    src = Net(preset="vs", search=ALL, reduction="weighted_mean", parametrization="class")
    _randomize(src, seed=5)
    path = src.export_loss(tmp_path / f"found{suffix}")
    doc = json.loads(path.read_text()) if suffix == ".json" else yaml.safe_load(path.read_text())
    assert doc["reduction"] == "weighted_mean" and doc["parametrization"] == "class" and doc["preset"] == "vs"
    assert doc["class_counts"] == COUNTS and doc["search"] == list(ALL)
    assert np.asarray(doc["offset"]).shape == (1, K)

    dst = Net(preset="ce")
    logits, target = _batch(seed=6)
    assert not torch.allclose(dst.autobalance_loss(logits, target), src.autobalance_loss(logits, target))
    dst.load_loss(path)
    assert dst.loss_frozen  # frozen by default
    assert dst.autobalance_reduction == "weighted_mean"
    assert isinstance(dst.autobalance, PerClass)
    for a, b in zip(dst.autobalance_tables(), src.autobalance_tables()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(dst.autobalance_loss(logits, target), src.autobalance_loss(logits, target),
                               rtol=0, atol=0)
    torch.testing.assert_close(dst.autobalance_loss(logits, target).double(),
                               _ref_loss(logits, target, *src.autobalance.tables(), reduction="weighted_mean"))
    assert "autobalance.base_offset" in dst.state_dict()

    dst.load_loss(path, freeze=False)
    assert not dst.loss_frozen
    with pytest.raises(ValueError, match=r"has 3 classes but class_counts has 4"):
        Net(counts=[9, 7, 5, 3]).load_loss(path)


def test_loss_module_is_a_plain_module_equal_to_the_training_loss():
    model = Net(preset="la", search=ALL, reduction="weighted_mean")
    _randomize(model, seed=7)
    crit = model.loss_module()
    assert type(crit) is AdjustedCrossEntropy
    assert not isinstance(crit, pl.LightningModule)
    assert list(crit.parameters()) == []
    assert crit.reduction == "weighted_mean"
    logits, target = _batch(seed=8)
    torch.testing.assert_close(crit(logits, target), model.autobalance_loss(logits, target), rtol=0, atol=0)
    # a snapshot: later changes of alpha do not reach it
    with torch.no_grad():
        model.autobalance.alpha_offset[0, 1] += 1.0
    assert not torch.allclose(crit(logits, target), model.autobalance_loss(logits, target))


@pytest.mark.parametrize("freeze", [False, True])
def test_configure_autobalance_from_loss_file(tmp_path, freeze):
    src = Net(preset="cdt", search=ALL)
    _randomize(src, seed=9)
    path = src.export_loss(tmp_path / "loss.yml")
    dst = Net(preset="ce", loss_file=path, freeze=freeze)
    assert dst.loss_frozen is freeze
    assert dst.autobalance.num_free() == 0  # a fixed loss to retrain with
    torch.testing.assert_close(dst.autobalance.class_counts[0], torch.tensor(COUNTS, dtype=torch.float64))
    logits, target = _batch(seed=10)
    torch.testing.assert_close(dst.autobalance_loss(logits, target), src.autobalance_loss(logits, target),
                               rtol=0, atol=0)
    _fit(dst, _loader(), steps=2)  # retraining with the loaded loss runs
    torch.testing.assert_close(dst.autobalance_loss(logits, target), src.autobalance_loss(logits, target),
                               rtol=0, atol=0)


def test_frequency_group_export_writes_interpolated_class_tables(tmp_path):
    counts = [20, 50, 10, 40, 30]  # frequency order: 1, 3, 4, 0, 2
    model = Net(counts=counts, preset="ce", parametrization="groups", group_size=2, search="offset")
    assert isinstance(model.autobalance, FrequencyGroups)
    values = torch.tensor([0.0, 1.0, 3.0])  # bins {1, 3}, {4, 0}, {2}
    with torch.no_grad():
        model.autobalance.alpha_offset.copy_(values[None])
    path = model.export_loss(tmp_path / "groups.json")
    doc = json.loads(path.read_text())
    assert doc["num_classes"] == 5 and doc["parametrization"] == "groups"
    offset = torch.tensor(doc["offset"], dtype=torch.float64)
    assert offset.shape == (1, 5)
    # reference: linear interpolation at frequency positions 0..4 between bin centres 0.5, 2.5, 4
    at_position = np.interp(np.arange(5), [0.5, 2.5, 4.0], values.numpy())
    v = torch.empty(5, dtype=torch.float64)
    v[[1, 3, 4, 0, 2]] = torch.tensor(at_position, dtype=torch.float64)
    torch.testing.assert_close(offset[0], v - v.mean(), rtol=1e-6, atol=1e-6)
    # the search itself used bin-constant values
    step = torch.tensor([1.0, 0.0, 3.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(model.autobalance_tables().offset[0].double(), step - step.mean(), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(model.loss_module().offset[0].double(), v - v.mean(), rtol=1e-6, atol=1e-6)
    # the exported loss loads into a per-class model of the same size
    other = Net(counts=counts)
    other.load_loss(path)
    torch.testing.assert_close(other.autobalance_tables().offset[0].double(), v - v.mean(), rtol=1e-6, atol=1e-6)


def test_freeze_loss():
    model = Net()
    assert model.loss_frozen is False
    model.freeze_loss()
    assert model.loss_frozen is True and model.autobalance.frozen is True
    assert model.state_dict()["autobalance._extra_state"]["frozen"] is True
    model.unfreeze_loss()
    assert model.loss_frozen is False
    assert Net(freeze=True).loss_frozen is True


def test_missing_configure_autobalance_raises():
    model = Net(configure=False)
    logits, target = _batch()
    match = (r"Net uses AutoBalanceMixin, but its class counts are not known: looked in \(not attached to a "
             r"Trainer\)\. Give them with `self\.configure_autobalance\(class_counts=\[\.\.\.\]\)`")
    with pytest.raises(RuntimeError, match=match):
        model.autobalance_loss(logits, target)
    with pytest.raises(RuntimeError, match=match):
        model.autobalance_tables()
    with pytest.raises(RuntimeError, match=match):
        model.export_loss("unused.yaml")
    with pytest.raises(RuntimeError, match=match):
        model.loss_module()
    with pytest.raises(RuntimeError, match=match):
        model.freeze_loss()
    with pytest.raises(RuntimeError, match=match):
        _ = model.loss_frozen


def test_configure_autobalance_rejects_a_non_mean_reduction():
    with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'weighted_mean' for a training loss; got 'sum'"):
        Net(reduction="sum")


# ---------------------------------------------------------------- batches


def test_autobalance_unpack():
    model = Net()
    x, y, g = torch.randn(4, D), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 1, 0])
    assert model.autobalance_unpack((x, y)) == (x, y, None)
    assert model.autobalance_unpack([x, y, g]) == (x, y, g)
    assert model.autobalance_unpack({"x": x, "y": y}) == (x, y, None)
    assert model.autobalance_unpack({"x": x, "y": y, "g": g}) == (x, y, g)
    assert model.autobalance_unpack({"input": x, "target": y, "group": g}) == (x, y, g)
    assert model.autobalance_unpack({"inputs": x, "label": y}) == (x, y, None)
    assert unpack_batch({"x": x, "targets": y}) == (x, y, None)
    with pytest.raises(ValueError, match=r"Cannot unpack a batch of type tuple of length 1: expected \(x, y\), "
                                         r"\(x, y, g\) or a mapping with keys 'x' and 'y'"):
        model.autobalance_unpack((x,))
    with pytest.raises(ValueError, match=r"Cannot unpack a batch of type list of length 4"):
        model.autobalance_unpack([x, y, g, g])
    with pytest.raises(ValueError, match=r"Cannot unpack a batch of type Tensor"):
        model.autobalance_unpack(x)
    with pytest.raises(ValueError, match=r"Cannot unpack a batch of type dict.*Override `autobalance_unpack"):
        model.autobalance_unpack({"x": x, "labels_missing": y})


class _DictGroups(Dataset):
    def __init__(self, x, y, g):
        self.x, self.y, self.g = x, y, g

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "g": self.g[i]}


def test_class_by_group_tables_with_dict_batches():
    torch.manual_seed(2)
    table = [[30, 10, 4], [6, 8, 20]]
    model = Net(counts=table, preset="la", search=("offset",), num_groups=2)
    assert model.autobalance.alpha()["offset"].shape == (2, K)
    x, y = _data([36, 18, 24])
    g = (torch.arange(len(y)) % 2).long()
    _fit(model, DataLoader(_DictGroups(x, y, g), batch_size=16, shuffle=True), steps=3)
    _randomize(model, seed=11)
    delta, offset, weight = model.autobalance.tables()
    with torch.no_grad():
        f = model(x)
        loss = model.autobalance_loss(f, y, g)
    z = delta.double()[g] * f.double() + offset.double()[g]
    nll = torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]
    expected = (weight.double()[g, y] * nll).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"group index is needed"):
        model.autobalance_loss(f, y)


# ---------------------------------------------------------------- the table cache


def test_table_cache_follows_in_place_changes():
    model = Net(preset="la", search=("offset", "delta"))
    logits, target = _batch(seed=12)
    first = model.autobalance_tables()
    assert model.autobalance_tables() is first  # cached while nothing changes
    loss0 = model.autobalance_loss(logits, target)

    with torch.no_grad():
        model.autobalance.alpha_offset.add_(torch.tensor([[1.0, 0.0, -0.5]]))
    loss1 = model.autobalance_loss(logits, target)
    assert not torch.allclose(loss1, loss0)
    for a, b in zip(model.autobalance_tables(), model.autobalance.tables()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(loss1.double(), _ref_loss(logits, target, *model.autobalance.tables()))

    with torch.no_grad():
        model.autobalance.alpha_delta[0, 2] += 0.7  # indexed in-place update
    loss2 = model.autobalance_loss(logits, target)
    assert not torch.allclose(loss2, loss1)
    torch.testing.assert_close(loss2.double(), _ref_loss(logits, target, *model.autobalance.tables()))

    # a common shift of per-class alpha is invisible by design (centred offsets, fixed geometric mean)
    with torch.no_grad():
        model.autobalance.alpha_offset.add_(1.0)
    torch.testing.assert_close(model.autobalance_loss(logits, target), loss2)

    # load_state_dict copies in place and is picked up too
    other = Net(preset="la", search=("offset", "delta"))
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model.autobalance_loss(logits, target), loss0, rtol=0, atol=0)


def test_table_cache_with_dataset_scalars():
    model = Net(preset="la", parametrization="dataset", search="offset")
    assert isinstance(model.autobalance, DatasetDependent)
    logits, target = _batch(seed=13)
    loss0 = model.autobalance_loss(logits, target)
    with torch.no_grad():
        model.autobalance.alpha_tau.add_(1.0)  # tau 1 -> 2
    loss1 = model.autobalance_loss(logits, target)
    pi = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    torch.testing.assert_close(loss1.double(), F.cross_entropy(logits.double() + 2.0 * torch.log(pi), target),
                               rtol=1e-6, atol=1e-6)
    assert not torch.allclose(loss0, loss1)


# ---------------------------------------------------------------- precision


def test_float64_module():
    torch.manual_seed(3)
    model = Net(preset="vs", search=ALL)
    _randomize(model, seed=14)
    tables32 = model.autobalance.tables()
    logits, target = _batch(seed=15, dtype=torch.float64)
    model.autobalance_tables()  # fill the cache with float32 tables
    out = model.to(torch.float64)
    assert out is model
    assert all(t.dtype == torch.float64 for t in model.autobalance.alpha().values())
    assert model.layer.weight.dtype == torch.float64
    tables = model.autobalance_tables()
    assert all(t.dtype == torch.float64 for t in tables)
    loss = model.autobalance_loss(logits, target)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, _ref_loss(logits, target, *tables), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, _ref_loss(logits, target, *tables32), rtol=1e-6, atol=1e-6)
    # training a float64 model works and leaves alpha alone
    alpha = {k: v.clone() for k, v in model.autobalance.alpha().items()}
    x, y = _data()
    _fit(model, DataLoader(TensorDataset(x.double(), y), batch_size=16), steps=2)
    assert model.layer.weight.dtype == torch.float64
    for k, v in model.autobalance.alpha().items():
        torch.testing.assert_close(v, alpha[k], rtol=0, atol=0)

    # a half-precision cast never lowers alpha: a float64 module keeps float64, a float32 one float32
    model.to(torch.bfloat16)
    assert model.layer.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float64 for t in model.autobalance.alpha().values())
    fresh = Net(preset="vs", search=ALL)
    _randomize(fresh, seed=14)
    fresh.to(torch.bfloat16)
    assert fresh.layer.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in fresh.autobalance.alpha().values())
    low = fresh.autobalance_loss(logits.to(torch.bfloat16), target)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), _ref_loss(logits.to(torch.bfloat16), target, *tables32),
                               rtol=1e-5, atol=1e-5)


def test_loaded_loss_rebuilds_the_preset_on_the_new_class_counts(tmp_path):
    """A loss searched on a split and loaded for retraining keeps the searched deviation from its preset but
    rebuilds the preset on the retraining counts (here: logit adjustment on other counts)."""
    search_counts, full_counts = [8, 4, 1], [10, 5, 2]
    src = Net(counts=search_counts, preset="la", search=("offset", "weight"), parametrization="class")
    _randomize(src, seed=3)
    path = src.export_loss(tmp_path / "found.yaml")
    dst = Net(counts=full_counts, preset="ce")
    dst.load_loss(path)
    got = dst.autobalance_tables()
    deviation = src.autobalance.tables().offset - torch.log(torch.tensor([search_counts]) / sum(search_counts))
    expected = torch.log(torch.tensor([full_counts]) / sum(full_counts)) + deviation
    # offsets are defined up to a common shift: compare centred rows
    torch.testing.assert_close(got.offset - got.offset.mean(), expected - expected.mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.weight, src.autobalance.tables().weight, rtol=0, atol=1e-6)
    # A file without the free values (absolute tables only) is taken as it is.
    from lightning_autobalance.core.losses import save_loss_tables

    plain = save_loss_tables(tmp_path / "plain.json", src.autobalance.tables())
    dst.load_loss(plain)
    torch.testing.assert_close(dst.autobalance_tables().offset, src.autobalance.tables().offset, rtol=0, atol=0)


def test_loaded_hierarchical_loss_rebuilds_its_shared_part_on_the_new_class_counts(tmp_path):
    """The default parametrisation: ``tau`` multiplies ``log pi`` of the *retraining* counts, the residuals stay."""
    search_counts, full_counts = [8, 4, 1], [10, 5, 2]
    src = Net(counts=search_counts, preset="ce", search="offset")
    assert src.autobalance.kind == "hierarchical"
    with torch.no_grad():
        src.autobalance.alpha()["tau"].fill_(0.8)
        src.autobalance.alpha()["offset"].copy_(torch.tensor([[0.3, -0.1, 0.5]]))
    dst = Net(counts=full_counts, preset="ce")
    dst.load_loss(src.export_loss(tmp_path / "found.yaml"))
    got = dst.autobalance_tables().offset[0].double()
    residual = torch.tensor([0.3, -0.1, 0.5], dtype=torch.float64)
    expected = 0.8 * torch.log(torch.tensor(full_counts, dtype=torch.float64) / sum(full_counts)) + residual
    torch.testing.assert_close(got - got.mean(), expected - expected.mean(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- what the loss expects from the model


@pytest.mark.parametrize(("preset", "search", "warns"), [("vs", (), True), ("la", ("delta", "offset"), True),
                                                       ("la", ("offset",), False), ("ce", (), False)])
def test_log_probability_outputs_warn_when_delta_matters(preset, search, warns):
    model = Net(preset=preset, search=search)
    x, y = _data()
    log_probs = F.log_softmax(model(x), dim=1)
    import warnings as _warnings

    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        model.autobalance_loss(log_probs, y)
        model.autobalance_loss(log_probs, y)  # checked once
    said = [w for w in caught if "look like log-probabilities" in str(w.message)]
    assert len(said) == (1 if warns else 0)
    # raw scores never warn
    fresh = Net(preset=preset, search=search)
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        fresh.autobalance_loss(fresh(x), y)
    assert not [w for w in caught if "log-probabilities" in str(w.message)]


def test_the_mixin_may_come_before_or_after_lightning_module():
    """The mixin overrides no LightningModule method, so the order of the bases does not matter."""
    overlap = {n for n in vars(AutoBalanceMixin) if not n.startswith("__")} & set(dir(pl.LightningModule))
    assert overlap == set()
    x, y = _data()
    from conftest import linear_module

    first = Net(preset="la")
    last = linear_module(pl.LightningModule, AutoBalanceMixin, in_features=D)(COUNTS, preset="la")
    last.load_state_dict(first.state_dict())
    torch.testing.assert_close(first.autobalance_loss(first(x), y), last.autobalance_loss(last(x), y))
    _fit(last, _loader())
    assert [n for n, _ in last.named_parameters()] == ["layer.weight", "layer.bias"]


def test_a_module_built_from_a_trained_one_copies_its_found_loss():
    """E.g. an SWA module whose __init__ calls a bare super().__init__(): ``autobalance_like`` brings counts and found
    loss."""
    trained = Net(preset="ce", search="offset")
    with torch.no_grad():
        trained.autobalance.alpha()["tau"].fill_(0.9)
        trained.autobalance.alpha()["offset"].copy_(torch.tensor([[0.2, -0.1, 0.4]]))
    swa = Net(configure=False)
    swa.autobalance_like(trained, freeze=True)
    for a, b in zip(swa.autobalance_tables(), trained.autobalance_tables()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert swa.loss_frozen and not trained.loss_frozen
    assert swa.autobalance.class_counts.tolist() == trained.autobalance.class_counts.tolist()
    with torch.no_grad():
        swa.autobalance.alpha()["tau"].fill_(0.0)  # a copy, not the same tensors
    assert float(trained.autobalance.alpha()["tau"]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"class_counts has shape \(1, 4\), but the module given as `like` has"):
        Net(configure=False).autobalance_like(trained, class_counts=[5, 4, 3, 2])
    assert Net(configure=False).configure_autobalance(None) is None  # counts found at setup (test_real_shapes.py)
    with pytest.raises(ValueError, match=r"autobalance_like: Net has no AutoBalance loss yet"):
        Net(configure=False).autobalance_like(Net(configure=False))


def test_the_logits_hand_off_to_the_callback_is_public():
    """autobalance_request_logits / autobalance_recorded_logits: what the callback uses to reuse a step's logits."""
    model = Net()
    x, y = _data()
    logits = model(x)
    model.autobalance_loss(logits, y)
    assert model.autobalance_recorded_logits is None  # nothing kept unless asked
    model.autobalance_request_logits()
    loss = model.autobalance_loss(logits, y)
    kept = model.autobalance_recorded_logits
    assert kept is not None and torch.equal(kept, logits) and not kept.requires_grad and loss.requires_grad
    model.autobalance_request_logits(False)
    assert model.autobalance_recorded_logits is None
    model.autobalance_loss(logits, y)
    assert model.autobalance_recorded_logits is None
    with pytest.raises(RuntimeError, match=r"its class counts are not known"):
        Net(configure=False).autobalance_parameters()


# ---------------------------------------------------------------- counts that arrive late


class Bare(AutoBalanceMixin, pl.LightningModule):
    """A module that never mentions counts: the mixin in the bases and the loss call, nothing else."""

    def __init__(self, k: int = K, configure_in_setup: bool = False, **autobalance):
        super().__init__()
        self.layer = nn.Linear(D, k)
        self.configure_in_setup = configure_in_setup
        self.autobalance_kwargs = autobalance
        if autobalance and not configure_in_setup:
            self.configure_autobalance(**autobalance)

    def setup(self, stage):
        if self.configure_in_setup:  # the counts are known by now: the datamodule has been set up
            self.configure_autobalance(self.trainer.datamodule.class_counts, **self.autobalance_kwargs)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CountsDataModule(pl.LightningDataModule):
    """Makes its data in setup(), like most datamodules; optionally offers class_counts or a SearchSplit."""

    def __init__(self, offer: str = "none", counts=COUNTS):
        super().__init__()
        self.offer, self.counts = offer, counts

    def setup(self, stage):
        from lightning_autobalance.data import search_split

        x, y = _data(self.counts)
        full = TensorDataset(x, y)
        if self.offer == "split":
            self.split = search_split(full)
            self.train_set = self.split.lower
        else:
            self.train_set = full
        if self.offer == "attribute":
            self.class_counts = [2 * c for c in self.counts]  # a different scale: proves it was used

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)


@pytest.mark.parametrize(("offer", "expected"), [
    ("none", COUNTS), ("attribute", [2 * c for c in COUNTS]), ("split", [32, 13, 6])])
def test_counts_are_found_at_setup(offer, expected):
    model = Bare()
    assert model.autobalance_loss_calls == 0
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=CountsDataModule(offer))
    assert model.autobalance.class_counts[0].tolist() == expected
    assert model.autobalance.preset == "la" and model.autobalance.search == ("offset",)  # the defaults
    assert model.autobalance_loss_calls == 2


def test_counts_found_from_plain_training_dataloaders():
    model = Bare(preset="ce", search=("offset", "weight"))  # settings without counts
    assert model.configure_autobalance(preset="ce", search=("offset", "weight")) is None  # still pending
    _fit(model, _loader(), steps=2)
    assert model.autobalance.class_counts[0].tolist() == COUNTS and model.autobalance.preset == "ce"


def test_configure_autobalance_from_setup_works_and_keeps_the_loss_across_stages():
    model = Bare(configure_in_setup=True, preset="ce")
    dm = CountsDataModule("attribute")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.autobalance.class_counts[0].tolist() == [2 * c for c in COUNTS] and model.autobalance.preset == "ce"
    with torch.no_grad():
        model.autobalance.alpha()["tau"].fill_(0.7)
    model.setup("test")  # a setup that runs for every stage calls it again: the loss found so far stays
    assert float(model.autobalance.alpha()["tau"]) == pytest.approx(0.7)


def test_found_counts_come_back_from_a_checkpoint(tmp_path):
    model = Bare()
    trainer = _fit(model, _loader(), steps=2)
    with torch.no_grad():
        model.autobalance.alpha()["tau"].fill_(0.6)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    # a fresh module, no data: load_from_checkpoint, load_state_dict and trainer.test(ckpt_path=...)
    loaded = Bare.load_from_checkpoint(path)
    assert loaded.autobalance.class_counts[0].tolist() == COUNTS
    assert float(loaded.autobalance.alpha()["tau"]) == pytest.approx(0.6)
    fresh = Bare()
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    torch.testing.assert_close(fresh.autobalance_tables().offset, model.autobalance_tables().offset)
    # settings chosen without counts come back too
    ce = Bare(preset="ce", search=("offset", "weight"), reduction="weighted_mean")
    trainer = _fit(ce, _loader(), steps=1)
    trainer.save_checkpoint(tmp_path / "ce.ckpt")
    again = Bare()  # even a module whose __init__ would choose the defaults takes the saved settings
    again.load_state_dict(torch.load(tmp_path / "ce.ckpt", weights_only=False)["state_dict"])
    assert again.autobalance.preset == "ce" and again.autobalance.search == ("offset", "weight")
    assert again.autobalance_reduction == "weighted_mean"


def test_given_counts_win_and_are_checked_against_the_labels():
    model = Bare(k=K)
    model.configure_autobalance(list(reversed(COUNTS)))
    with pytest.warns(UserWarning, match=r"class counts given to configure_autobalance \[8, 16, 40\] disagree with "
                                         r"the training data's labels \[40, 16, 8\]"):
        _fit(model, _loader(), steps=2)
    assert model.autobalance.class_counts[0].tolist() == [8, 16, 40]  # given counts win
    import warnings as _warnings

    scaled = Bare(k=K)
    scaled.configure_autobalance([2 * c for c in COUNTS])  # the same frequencies (e.g. the whole set's counts)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", UserWarning)
        _warnings.filterwarnings("ignore", message=".*(workers|logging interval|LeafSpec|no AutoBalanceCallback).*")
        _fit(scaled, _loader(), steps=1)


def test_a_class_missing_from_the_training_data_is_named():
    model = Bare(k=4)
    model.configure_autobalance(num_classes=4)
    with pytest.raises(RuntimeError, match=r"has no sample of classes \[3\].*configure_autobalance\(num_classes"):
        _fit(model, _loader(), steps=1)
    short = Bare(k=4)  # without num_classes: 3 counts, and the shape error says where they came from
    with pytest.raises(ValueError, match=r"expected \(N, 3\)\. The counts were found from the labels of the training "
                                         r"data \(64 samples\).*num_classes="):
        _fit(short, _loader(), steps=1)


def test_autobalance_like_takes_the_found_loss():
    trained = Bare()
    _fit(trained, _loader(), steps=1)
    with torch.no_grad():
        trained.autobalance.alpha()["tau"].fill_(0.8)
    swa = Bare()
    swa.autobalance_like(trained)
    assert float(swa.autobalance.alpha()["tau"]) == pytest.approx(0.8) and not swa.loss_frozen
    _fit(swa, _loader(), steps=1)  # kept through a fit (its counts are not looked for again)
    assert float(swa.autobalance.alpha()["tau"]) == pytest.approx(0.8)
    swa.configure_autobalance()  # e.g. a setup() that configures again: the loss taken stays
    assert float(swa.autobalance.alpha()["tau"]) == pytest.approx(0.8)
    swa.configure_autobalance([4, 2, 1], preset="ce")  # counts given: a new loss
    assert swa.autobalance.preset == "ce" and swa.autobalance.class_counts[0].tolist() == [4, 2, 1]
    swa.configure_autobalance(preset="vs")  # new settings without counts: rebuilt on the counts known
    assert swa.autobalance.preset == "vs" and swa.autobalance.class_counts[0].tolist() == [4, 2, 1]


# ---------------------------------------------------------------- no silent mis-wiring


class Miswired(Bare):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.how == "old_criterion":
            return F.cross_entropy(logits, y)
        if self.how == "detached":
            return self.autobalance_loss(logits.detach(), y) + 0 * logits.sum()
        self.log("searched", self.autobalance_loss(logits, y))  # computed, then another loss returned
        return F.cross_entropy(logits, y)


def test_the_loss_calls_are_counted_for_the_callback():
    model = Miswired("old_criterion")
    _fit(model, _loader(), steps=3)
    assert model.autobalance_loss_calls == 0  # the callback raises on this (it reads the counter)
    model = Bare()
    _fit(model, _loader(), steps=3)
    assert model.autobalance_loss_calls == 3
    model.eval()
    model.autobalance_loss(*_batch())
    assert model.autobalance_loss_calls == 3  # evaluation calls are not counted


def test_detached_logits_are_an_error():
    with pytest.raises(RuntimeError, match=r"in training mode the logits carry no gradient"):
        _fit(Miswired("detached"), _loader(), steps=1)


def test_a_searched_loss_that_never_reaches_backward_is_an_error():
    with pytest.raises(RuntimeError, match=r"the losses it returned on the last 3 training calls never reached a "
                                           r"backward pass.*Return its value from training_step"):
        _fit(Miswired("logged_only"), _loader(), steps=5)


def test_the_log_softmax_warning_says_when_it_matters():
    model = Net(preset="la", search=("delta", "offset"))
    x, y = _data()
    with pytest.warns(UserWarning, match=r"That matters here because delta is searched.*With offsets only, the "
                                         r"default search, log_softmax is harmless"):
        model.autobalance_loss(F.log_softmax(model(x), dim=1), y)


def test_mixin_after_lightning_module_with_configure_and_no_counts(tmp_path):
    """After LightningModule in the bases the mixin's __init__ does not run; configure_autobalance() (no counts)
    in __init__ is then what lets a fresh module load a checkpoint."""

    class After(pl.LightningModule, AutoBalanceMixin):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(D, K)
            self.configure_autobalance()

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.autobalance_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = After()
    trainer = _fit(model, _loader(), steps=1)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    loaded = After.load_from_checkpoint(tmp_path / "after.ckpt")
    assert loaded.autobalance.class_counts[0].tolist() == COUNTS


def test_log_softmax_is_harmless_with_offsets_only():
    """What docs/recipes.md promises a tutorial module that keeps log_softmax: with offsets (and weights) searched
    and delta 1, the loss and its gradient are those of the raw scores."""
    model = Net(preset="la", search=("offset", "weight"))
    _randomize(model, seed=2)
    x, y = _data()
    raw = model(x).detach().requires_grad_(True)
    logp = F.log_softmax(raw, dim=1)
    torch.testing.assert_close(model.autobalance_loss(logp, y), model.autobalance_loss(raw, y))


def test_the_earlier_spellings_of_configure_autobalance_still_work_with_a_future_warning():
    """``validate_inputs=`` (now ``self.autobalance_validate``) and ``like=`` (now ``autobalance_like``)."""
    trained = Net(preset="ce", search="offset")
    model = Net(configure=False)
    with pytest.warns(FutureWarning, match=r"validate_inputs=\.\.\.\) is deprecated"):
        model.configure_autobalance(COUNTS, validate_inputs=False)
    assert model.autobalance_validate is False
    with pytest.warns(FutureWarning, match=r"like=other\) is deprecated"):
        params = model.configure_autobalance(None, like=trained, freeze=True)
    assert params is model.autobalance and model.loss_frozen
    for a, b in zip(model.autobalance_tables(), trained.autobalance_tables()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'presets'"):
        model.configure_autobalance(COUNTS, presets="la")
