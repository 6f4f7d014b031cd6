"""Tests of the networks in ``lightning_autobalance.models``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call, jvp, vjp

from lightning_autobalance.core.hypergradient import FunctionalModel
from lightning_autobalance.models import (
    NETWORK_NAMES,
    BasicBlockA,
    DigitsNet,
    ResNet32,
    ResNetCIFAR,
    TorchvisionResNet,
    build_network,
)

Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- helpers


def _logits_fn(model: nn.Module, x: torch.Tensor) -> Callable[[Params], torch.Tensor]:
    """Logits as a function of the parameters only, through the package's own
    :class:`~lightning_autobalance.core.hypergradient.FunctionalModel` (the one the hyper step uses): buffers are cloned
    on every call, so train-mode BatchNorm updates the clones, not the module."""
    fmodel = FunctionalModel(model)
    return lambda params: fmodel(params, x)


def _params(model: nn.Module) -> Params:
    return {name: p.detach() for name, p in model.named_parameters()}


def _random_direction(params: Params, seed: int) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=gen, dtype=p.dtype) * (p.abs().mean() + 1e-2) for name, p in params.items()
    }


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = (actual - expected).norm().item()
    scale = expected.norm().item()
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol}"


def _buffers_snapshot(model: nn.Module) -> Params:
    return {name: b.clone() for name, b in model.named_buffers()}


def _assert_buffers_unchanged(model: nn.Module, before: Params) -> None:
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"buffer {name} was modified"


def _check_jvp_and_vjp(model: nn.Module, x: torch.Tensor, seed: int) -> None:
    """jvp equals a central finite difference, vjp equals autograd; buffers stay untouched."""
    before = _buffers_snapshot(model)
    f = _logits_fn(model, x)
    params = _params(model)
    direction = _random_direction(params, seed)

    out, tangent = jvp(f, (params,), (direction,))
    _assert_close_rel(out, f(params), 1e-12)
    # Small step: with a larger one, a few of the many ReLUs switch sign inside the step and spoil
    # the difference (ResNet-32, train mode, one seed in 15: 1e-3 relative error at eps 1e-7).
    # At 1e-8 the rounding error is about 2e-8 relative.
    eps = 1e-8
    plus = f({k: p + eps * direction[k] for k, p in params.items()})
    minus = f({k: p - eps * direction[k] for k, p in params.items()})
    _assert_close_rel(tangent, (plus - minus) / (2 * eps), 1e-5)

    gen = torch.Generator().manual_seed(seed + 1)
    cotangent = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    out_v, vjp_fn = vjp(f, params)
    (grads,) = vjp_fn(cotangent)
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    expected = torch.autograd.grad(f(leaves), list(leaves.values()), cotangent)
    torch.testing.assert_close(out_v, out)
    for (name, g), e in zip(grads.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"vjp mismatch for {name}")
    _assert_buffers_unchanged(model, before)


# --------------------------------------------------------------------------- ResNetCIFAR


@pytest.mark.parametrize("depth", [20, 32])
def test_resnet_cifar_shapes(depth: int) -> None:
    torch.manual_seed(0)
    net = ResNetCIFAR(num_classes=7, depth=depth)
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 7)
    assert net.forward_features(x).shape == (2, 64)
    assert isinstance(net.head, nn.Linear)
    assert (net.head.in_features, net.head.out_features) == (64, 7)
    assert net.depth == depth
    n_blocks = sum(isinstance(m, BasicBlockA) for m in net.modules())
    assert n_blocks == 3 * (depth - 2) // 6


def test_resnet_cifar_in_channels_width_and_input_size() -> None:
    net = ResNetCIFAR(num_classes=5, depth=8, in_channels=1, width=8)
    x = torch.randn(3, 1, 28, 28)
    assert net(x).shape == (3, 5)
    assert net.forward_features(x).shape == (3, 32)
    assert net.num_features == 32


def test_resnet32_parameter_count() -> None:
    count = sum(p.numel() for p in ResNet32().parameters())
    assert count == 464_154  # "0.46 M" in He et al. (2016), Table 6
    assert sum(p.numel() for p in ResNet32(num_classes=100).parameters()) == 464_154 + 90 * 65
    assert isinstance(ResNet32(), ResNetCIFAR)
    assert ResNet32().depth == 32


@pytest.mark.parametrize("depth", [0, 2, 7, 14.0, 31, 33, 100, True])
def test_resnet_cifar_rejects_bad_depth(depth: object) -> None:
    with pytest.raises(ValueError, match=r"6n\+2.*20, 32, 44, 56, 110"):
        ResNetCIFAR(depth=depth)  # type: ignore[arg-type]


def test_resnet_cifar_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ResNetCIFAR(num_classes=0)
    with pytest.raises(ValueError, match="width"):
        ResNetCIFAR(width=0)


def test_option_a_shortcut_is_parameter_free() -> None:
    block = BasicBlockA(4, 8, stride=2)
    convs_and_bns = sum(p.numel() for m in (block.conv1, block.bn1, block.conv2, block.bn2) for p in m.parameters())
    assert sum(p.numel() for p in block.parameters()) == convs_and_bns
    x = torch.randn(2, 4, 6, 6)
    short = block.shortcut(x)
    assert short.shape == (2, 8, 3, 3)
    torch.testing.assert_close(short[:, 2:6], x[:, :, ::2, ::2])
    assert short[:, :2].abs().sum() == 0 and short[:, 6:].abs().sum() == 0
    assert block(x).shape == (2, 8, 3, 3)
    with pytest.raises(ValueError, match="cannot reduce"):
        BasicBlockA(8, 4)


def test_resnet_cifar_kaiming_normal_init() -> None:
    torch.manual_seed(0)
    net = ResNet32()
    conv = net.layer3[-1].conv2  # 64 x 64 x 3 x 3
    expected_std = math.sqrt(2.0 / (64 * 9))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    assert abs(net.head.weight.std().item() / math.sqrt(2.0 / 64) - 1) < 0.15


# --------------------------------------------------------------------------- DigitsNet


def test_digits_net_shapes() -> None:
    torch.manual_seed(0)
    net = DigitsNet(num_classes=10).eval()
    images = torch.randn(5, 1, 8, 8)
    flat = images.reshape(5, 64)
    assert net(images).shape == (5, 10)
    torch.testing.assert_close(net(images), net(flat))
    assert net.forward_features(flat).shape == (5, 128)
    assert isinstance(net.head, nn.Linear) and net.head.in_features == 128
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 3


def test_digits_net_options() -> None:
    net = DigitsNet(num_classes=3, in_features=20, hidden=16, depth=3, dropout=0.2, batch_norm=True)
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * 3
    assert all(m.bias is None for m in net.features if isinstance(m, nn.Linear))
    assert net(torch.randn(4, 20)).shape == (4, 3)

    linear = DigitsNet(num_classes=4, depth=0)
    assert len(linear.features) == 0 and linear.num_features == 64
    assert linear(torch.randn(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"hidden": 0}, "hidden"),
        ({"depth": -1}, "depth"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_digits_net_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsNet(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- TorchvisionResNet


def test_torchvision_resnet18_shapes() -> None:
    torch.manual_seed(0)
    net = TorchvisionResNet(num_classes=6, arch="resnet18")
    x = torch.randn(2, 3, 64, 64)
    assert net(x).shape == (2, 6)
    assert net.forward_features(x).shape == (2, 512)
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 6
    assert isinstance(net.backbone.fc, nn.Identity)
    # The head is registered once: no duplicate entries in the state dict.
    assert [k for k in net.state_dict() if k.endswith("fc.weight")] == []


def test_torchvision_resnet50_constructs() -> None:
    net = TorchvisionResNet(num_classes=100)
    assert net.arch == "resnet50"
    assert net.num_features == 2048
    assert (net.head.in_features, net.head.out_features) == (2048, 100)


def test_torchvision_unknown_arch() -> None:
    with pytest.raises(ValueError, match=r"resnet18, resnet34, resnet50, .*resnext50_32x4d"):
        TorchvisionResNet(arch="vgg16")


def test_torchvision_weights_without_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretrained weights reach the backbone; a new class count gets a fresh head."""
    torch.manual_seed(0)
    fake = torchvision.models.resnet18(weights=None).state_dict()
    calls: list[str] = []

    def fake_load(url: str, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append(url)
        return fake

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_load)

    same = TorchvisionResNet(num_classes=1000, arch="resnet18", weights="DEFAULT")
    torch.testing.assert_close(same.head.weight, fake["fc.weight"])
    torch.testing.assert_close(same.backbone.conv1.weight, fake["conv1.weight"])

    other = TorchvisionResNet(num_classes=7, arch="resnet18", weights="IMAGENET1K_V1")
    torch.testing.assert_close(other.backbone.layer4[1].conv2.weight, fake["layer4.1.conv2.weight"])
    assert other.head.out_features == 7
    assert len(calls) == 2

    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        TorchvisionResNet(arch="resnet18", weights="NOT_A_WEIGHT")


# --------------------------------------------------------------------------- build_network


def test_network_names() -> None:
    expected = {
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "digits_net",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
    }
    assert expected <= set(NETWORK_NAMES)


@pytest.mark.parametrize(("name", "depth"), [("resnet20", 20), ("resnet32", 32), ("ResNet56", 56)])
def test_build_cifar_resnets(name: str, depth: int) -> None:
    net = build_network(name, 12)
    assert isinstance(net, ResNetCIFAR)
    assert net.depth == depth
    assert net.head.out_features == 12
    assert build_network(name, 3, width=8).num_features == 32


def test_build_other_networks() -> None:
    digits = build_network("Digits-Net", 4, hidden=16)
    assert isinstance(digits, DigitsNet) and digits.num_features == 16 and digits.head.out_features == 4
    resnet = build_network("resnet18", 9)
    assert isinstance(resnet, TorchvisionResNet) and resnet.arch == "resnet18"
    assert resnet.head.out_features == 9


def test_build_network_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"known names: .*resnet32.*digits_net.*resnext50_32x4d"):
        build_network("resnet33", 10)


@pytest.mark.parametrize("cls", [ResNetCIFAR, ResNet32, DigitsNet, TorchvisionResNet])
def test_num_classes_is_first_argument(cls: type[nn.Module]) -> None:
    params = list(inspect.signature(cls.__init__).parameters)
    assert params[:2] == ["self", "num_classes"]


# --------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize(
    "make",
    [
        lambda: (ResNet32(num_classes=4), torch.randn(2, 3, 16, 16)),
        lambda: (DigitsNet(num_classes=4, batch_norm=True), torch.randn(6, 1, 8, 8)),
        lambda: (TorchvisionResNet(num_classes=4, arch="resnet18"), torch.randn(2, 3, 32, 32)),
    ],
    ids=["resnet32", "digits_net", "resnet18"],
)
def test_functional_call_matches_module(make: Callable[[], tuple[nn.Module, torch.Tensor]]) -> None:
    torch.manual_seed(0)
    net, x = make()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(functional_call(net, _params(net), (x,)), net(x), rtol=0, atol=0)

    # Train mode: the cloned-buffer function gives the module's output, and leaves its buffers alone.
    net.train()
    before = _buffers_snapshot(net)
    with torch.no_grad():
        out = _logits_fn(net, x)(_params(net))
    _assert_buffers_unchanged(net, before)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet32_jvp_vjp_float64(train: bool) -> None:
    torch.manual_seed(0)
    net = ResNet32(num_classes=5).double().train(train)
    if not train:
        # Non-trivial running statistics, so eval-mode BatchNorm is not the identity.
        with torch.no_grad():
            net(torch.randn(8, 3, 16, 16, dtype=torch.float64))
        net.eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    _check_jvp_and_vjp(net, x, seed=1)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_digits_net_jvp_vjp_float64(train: bool, batch_norm: bool) -> None:
    torch.manual_seed(0)
    net = DigitsNet(num_classes=10, batch_norm=batch_norm).double().train(train)
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    _check_jvp_and_vjp(net, x, seed=2)


# ---------------------------------------------------------------------------------------------------------------
# ImbalancedClassifier's optimiser and schedule (LightningCLI callables) and WarmupDecayLR


def _expected_factor(step: int, spe: float, epochs: int, schedule: str, warmup: float, milestones: list[int],
                     decay: float) -> float:
    """The schedule as the paper's recipe states it (linear warm-up, then cosine / step / constant), written out."""
    epoch = step / spe
    if warmup > 0 and epoch < warmup:
        return (epoch + 1.0 / spe) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min((epoch - warmup) / max(epochs - warmup, 1e-8), 1.0)))
    if schedule == "step":
        return decay ** sum(epoch >= m for m in milestones)
    return 1.0


def _attach(model: nn.Module, total: float, epochs: int | None) -> None:
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(estimated_stepping_batches=total, max_epochs=epochs)  # what a Trainer exposes


def _lrs(config: dict, steps: int) -> list[float]:
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        seen.append(opt.param_groups[0]["lr"])
    return seen


@pytest.mark.parametrize("schedule, warmup, milestones, decay, lr, total, epochs", [
    ("cosine", 0.0, [160, 180], 0.1, None, 50, 5),     # the defaults (None: no callables given)
    ("step", 5, [8, 15], 0.1, 0.1, 137, 20),           # the paper's CIFAR recipe, shortened
    ("cosine", 1.5, [160, 180], 0.1, 0.05, 50, 7),
    ("constant", 0.5, [1], 0.5, 0.2, 9, 3),
])
def test_classifier_schedule_is_the_papers_recipe(schedule, warmup, milestones, decay, lr, total, epochs) -> None:
    """Default: SGD(lr 0.1, momentum 0.9, weight decay 2e-4) under a cosine to 0 over the run, stepped every optimizer
    step; with callables, the given SGD under WarmupDecayLR: the rate of every step equals the written-out recipe to
    the last bit (the Digits-LT evidence rests on it)."""
    import functools

    from lightning_autobalance import ImbalancedClassifier
    from lightning_autobalance.core.lr_schedule import WarmupDecayLR

    kwargs = {}
    if lr is not None:
        kwargs = {"optimizer": functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=2e-4),
                  "lr_scheduler": functools.partial(WarmupDecayLR, schedule=schedule, warmup_epochs=warmup,
                                                    milestones=milestones, lr_decay=decay)}
    model = ImbalancedClassifier("digits_net", 3, [10, 5, 2], **kwargs)
    _attach(model, total, epochs)
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    opt = config["optimizer"]
    assert type(opt) is torch.optim.SGD
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay", "nesterov", "dampening")} == {
        "lr": lr or 0.1, "momentum": 0.9, "weight_decay": 2e-4, "nesterov": False, "dampening": 0}
    spe = max(total / epochs, 1.0)
    expected = [(lr or 0.1) * _expected_factor(t, spe, epochs, schedule, warmup, sorted(milestones), decay)
                for t in range(total + 3)]
    assert _lrs(config, total + 2) == expected


def test_classifier_without_a_trainer_keeps_the_optimizers_rate() -> None:
    """Built outside a fit (``self.trainer`` not attached, or a run of unknown length): the optimizer alone."""
    from lightning_autobalance import ImbalancedClassifier

    model = ImbalancedClassifier("digits_net", 3, [10, 5, 2])
    assert model._attached_trainer() is None
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.1
    _attach(model, math.inf, 3)
    assert isinstance(model.configure_optimizers(), torch.optim.SGD)
    _attach(model, 30, -1)
    assert isinstance(model.configure_optimizers(), torch.optim.SGD)


def test_classifier_other_schedulers_step_every_epoch() -> None:
    import functools

    from lightning_autobalance import ImbalancedClassifier

    step = ImbalancedClassifier("digits_net", 3, [10, 5, 2],
                                lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2))
    _attach(step, 30, 3)
    config = step.configure_optimizers()["lr_scheduler"]
    assert isinstance(config["scheduler"], torch.optim.lr_scheduler.StepLR) and config["interval"] == "epoch"
    plateau = ImbalancedClassifier("digits_net", 3, [10, 5, 2],
                                   lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    config = plateau.configure_optimizers()["lr_scheduler"]  # built without a trainer too: its own units
    assert config["monitor"] == "val/balanced_error" and config["interval"] == "epoch"
    from pytorch_lightning.cli import ReduceLROnPlateau

    watched = ImbalancedClassifier("digits_net", 3, [10, 5, 2],
                                   lr_scheduler=functools.partial(ReduceLROnPlateau, monitor="val/head_error"))
    assert watched.configure_optimizers()["lr_scheduler"]["monitor"] == "val/head_error"


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": "sgd"}, "optimizer must be a callable"),
    ({"lr_scheduler": 3}, "lr_scheduler must be a callable"),
    ({"optimizer": lambda params: torch.optim.SGD(params, lr=-1.0)}, "optimizer: Invalid learning rate"),
    ({"optimizer": lambda params: list(params)}, "must return a torch.optim.Optimizer"),
    ({"lr_scheduler": lambda opt: __import__("lightning_autobalance.core.lr_schedule", fromlist=["_"]).WarmupDecayLR(
        opt, schedule="linear")}, "lr_scheduler: schedule must be"),
])
def test_classifier_checks_optimisation_at_construction(kwargs: dict, match: str) -> None:
    from lightning_autobalance import ImbalancedClassifier

    with pytest.raises(ValueError, match=match):
        ImbalancedClassifier("digits_net", 3, [10, 5, 2], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "linear"}, "schedule must be"),
    ({"warmup_epochs": -1}, "warmup_epochs must be"),
    ({"warmup_epochs": math.nan}, "warmup_epochs must be"),
    ({"lr_decay": 0.0}, "lr_decay must lie"),
    ({"lr_decay": 1.5}, "lr_decay must lie"),
    ({"milestones": [3, -1]}, "milestones must be"),
])
def test_warmup_decay_checks_its_arguments(kwargs: dict, match: str) -> None:
    from lightning_autobalance.core.lr_schedule import WarmupDecayLR

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        WarmupDecayLR(opt, **kwargs)


def test_warmup_decay_state_is_plain_and_resumes(tmp_path) -> None:
    """The scheduler's state (run length included) loads with ``weights_only=True`` and resumes the same rates."""
    from lightning_autobalance.core.lr_schedule import WarmupDecayLR

    def fresh() -> tuple[torch.optim.Optimizer, WarmupDecayLR]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, WarmupDecayLR(opt, "step", warmup_epochs=1, milestones=[2], lr_decay=0.5)

    opt, scheduler = fresh()
    assert scheduler.run_length is None and opt.param_groups[0]["lr"] == 0.1  # the optimizer's rate until sized
    with pytest.raises(ValueError, match="steps_per_epoch"):
        scheduler.fit_to_run(0, 3)
    with pytest.raises(ValueError, match="epochs"):
        scheduler.fit_to_run(4, 0)
    scheduler.fit_to_run(4, 3)
    assert scheduler.run_length == (4, 3) and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    for _ in range(5):
        opt.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    rest = [scheduler.step() or opt.param_groups[0]["lr"] for _ in range(6)]
    opt2, resumed = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert resumed.run_length == (4, 3)
    assert [resumed.step() or opt2.param_groups[0]["lr"] for _ in range(6)] == rest
    assert rest[-1] == pytest.approx(0.05)
