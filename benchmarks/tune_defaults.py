"""Tune the default settings of AutoBalanceCallback on long-tailed digits (validation set, never the test set).

Protocol of one run (one config, one seed ``s``):

1. search: fit ``ImbalancedClassifier(network="digits_net", preset=..., search=...)`` on
   ``LongTailDigits(search_split=True, seed=s)`` (80% lower part / 20% upper part) with an
   ``AutoBalanceCallback`` built from the config;
2. export the searched loss (``model.export_loss``);
3. retrain from scratch on the whole long-tailed set (``search_split=False``) with ``loss_file=`` (frozen);
4. balanced error of the retrained model on a held-out balanced VALIDATION set (and on the test set only when
   ``--test`` is given).

Baselines ("ce", "la") skip steps 1-2 and train with the preset directly.

Data: digits has about 180 images per class. A balanced test set of ``--test-per-class`` (30) images per class is
taken out first (``test_seed=0``, as ``LongTailDigits`` does); then a balanced validation set of
``--val-per-class`` (30) images per class is taken out of what is left (``--val-seed``), disjoint from the test
set; the long-tailed training set is drawn from the rest. Training data is therefore identical whichever of the
two sets is evaluated, and the validation set never overlaps the test set or the training data.

Example::

    python benchmarks/tune_defaults.py --configs ce la default --seeds 0 1 2 3 4
    python benchmarks/tune_defaults.py --list
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_autobalance import AutoBalanceCallback, Estimator
from lightning_autobalance.core.losses import save_loss_tables
from lightning_autobalance.core.parametrization import build_parametrization
from lightning_autobalance.data import LongTailDigits
from lightning_autobalance.data.fold_in import fold_in_epoch
from lightning_autobalance.data.profiles import select_long_tail
from lightning_autobalance.lightning.classifier import ImbalancedClassifier
from lightning_autobalance.models import NormedLinear, build_network

# ---------------------------------------------------------------------------------------------------------------
# Data: LongTailDigits with an extra balanced validation set carved out of the pool
# ---------------------------------------------------------------------------------------------------------------


class HeldOutDigits(LongTailDigits):
    """``LongTailDigits`` that also holds out ``val_per_class`` images per class (balanced) for validation.

    The test set is taken first (exactly as in ``LongTailDigits``), then the validation set from the remaining
    pool (seeded by ``val_seed``); the long-tailed training set comes from what is left.
    """

    def __init__(self, val_per_class: int = 30, val_seed: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_per_class = val_per_class
        self.val_seed = val_seed
        self._val: np.ndarray | None = None

    def _load_pool(self) -> tuple[np.ndarray, list[str]]:
        _, names = super()._load_pool()
        assert self._targets is not None and self._pool is not None and self._images is not None
        pool = self._pool
        picked = select_long_tail(self._targets[pool], [self.val_per_class] * len(names), self.val_seed)
        self._val = np.sort(pool[picked])
        self._pool = np.setdiff1d(pool, self._val)
        assert not set(self._val.tolist()) & set(self._test.tolist())  # type: ignore[union-attr]
        self._mean = float(self._images[self._pool].mean())
        self._std = float(self._images[self._pool].std())
        return self._targets[self._pool], names

    def eval_tensors(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and labels of the ``"val"`` or ``"test"`` set."""
        self._ensure_plan()
        assert self._images is not None and self._targets is not None
        rows = self._val if which == "val" else self._test
        x = (self._images[rows] - self._mean) / self._std
        return x, torch.as_tensor(self._targets[rows])


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------


class ScaledCosineHead(nn.Module):
    """``s * cos(feature, w_k)``: bounded logits, so the training softmax never saturates completely."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        self.cos = NormedLinear(in_features, out_features)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.cos(x)


def make_network(cos_scale: float | None) -> Callable[[int], nn.Module] | str:
    if cos_scale is None:
        return "digits_net"

    def build(num_classes: int) -> nn.Module:
        net = build_network("digits_net", num_classes)
        net.head = ScaledCosineHead(net.num_features, num_classes, cos_scale)
        return net

    return build


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

#: Library defaults of AutoBalanceCallback when this tuning started (spelled out so the table is self-contained;
#: ``sgd`` is the learning rate of SGD with momentum 0.9 as the hyper-optimizer).
CURRENT = dict(method="neumann", terms=0, eta=1.0, every_n_steps=10, train_batches=1, upper_batches=1,
               sgd=0.05, warmup_fraction=0.2, max_norm=None)


def cfg(base: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    out = dict(base or {})
    out.update(kw)
    return out


# model/search side keys: preset, search, param (parametrization), cos (cosine-head scale), augment, adam (lr of
# Adam as hyper optimizer instead of SGD), everything else goes to AutoBalanceCallback.
S = dict(preset="la", search="delta,offset")
CONFIGS: dict[str, dict[str, Any]] = {
    # baselines: no search
    "ce": dict(baseline="ce"),
    "la": dict(baseline="la"),
    "ce_cos": dict(baseline="ce", cos=16.0),
    "la_cos": dict(baseline="la", cos=16.0),
    "la_tau0.5": dict(baseline="la", tau=0.5),
    "la_tau1.5": dict(baseline="la", tau=1.5),
    "la_tau2": dict(baseline="la", tau=2.0),
    "vs": dict(baseline="vs"),
    "cdt": dict(baseline="cdt"),
    "cdt_g0.1": dict(baseline="cdt", gamma=0.1),
    "vs_g0.1": dict(baseline="vs", gamma=0.1),
    # the search pipeline with no hyper step at all (LA start, tables from the search split's counts)
    "noop": cfg(S, start_step=10**9),
    # the recommendation (docs/tuning.md): LA start, per-class offsets, Adam 0.01, the rest as the current defaults
    "recommended": cfg(S, search="offset", adam=0.01),
    # the library's defaults as they are now, nothing overridden (LA start and offsets are the model's defaults)
    "library_defaults": dict(library=True, preset="la", search="offset"),
    # one-phase (one fit of --epochs epochs: search on the split until the fold-in, then train on everything)
    "one_phase": dict(library=True, one_phase=0.5),
    "one_phase_f0.3": dict(library=True, one_phase=0.3),
    "one_phase_f0.7": dict(library=True, one_phase=0.7),
    "one_phase_f0.2": dict(library=True, one_phase=0.2),
    "one_phase_f0.3_w0.1": dict(library=True, one_phase=0.3, warmup_fraction=0.1),
    "one_phase_f0.2_w0.1": dict(library=True, one_phase=0.2, warmup_fraction=0.1),
    # ... and from cross-entropy
    "one_phase_ce": dict(library=True, one_phase=0.5, preset="ce"),
    # the low-dimensional option: tau only (dataset parametrisation), Adam 0.1 annealed to 0 over the search
    "recommended_dataset": cfg(S, param="dataset", search="offset", adam=0.1, hyper_cosine=True),
    # sanity: from cross-entropy, searching offsets only, the search should move towards LA
    "sanity_ce_offset": cfg(S, preset="ce", search="offset", adam=0.1),
    "sanity_ce_tau": cfg(S, preset="ce", param="dataset", search="offset", adam=0.1),
    # the current defaults, LA start, delta+offset
    "default": cfg(S),
    # hyper learning rate (SGD momentum 0.9)
    "sgd_lr0.005": cfg(S, sgd=0.005),
    "sgd_lr0.02": cfg(S, sgd=0.02),
    "sgd_lr0.2": cfg(S, sgd=0.2),
    "sgd_lr0.05_clip1": cfg(S, sgd=0.05, max_norm=1.0),
    "sgd_lr0.2_clip1": cfg(S, sgd=0.2, max_norm=1.0),
    "sgd_lr0.005_offset": cfg(S, sgd=0.005, search="offset"),
    "sgd_lr0.05_offset": cfg(S, sgd=0.05, search="offset"),
    "sgd_lr0.5_offset": cfg(S, sgd=0.5, search="offset"),
    # Adam
    "adam_0.003": cfg(S, adam=0.003),
    "adam_0.01": cfg(S, adam=0.01),
    "adam_0.03": cfg(S, adam=0.03),
    "adam_0.1": cfg(S, adam=0.1),
    "adam_0.001": cfg(S, adam=0.001),
    # schedule
    "adam_0.01_k1": cfg(S, adam=0.01, every_n_steps=1),
    "adam_0.003_k1": cfg(S, adam=0.003, every_n_steps=1),
    "adam_0.01_k3": cfg(S, adam=0.01, every_n_steps=3),
    "adam_0.01_w0": cfg(S, adam=0.01, warmup_fraction=0.0),
    "adam_0.01_w0.5": cfg(S, adam=0.01, warmup_fraction=0.5),
    # batches
    "adam_0.01_b4_2": cfg(S, adam=0.01, train_batches=4, upper_batches=2),
    # methods
    "adam_0.01_unroll": cfg(S, adam=0.01, method="unroll", eta=0.05),
    "adam_0.01_neu5": cfg(S, adam=0.01, method="neumann", terms=5, eta=0.1, weight_decay=5e-4),
    "adam_0.01_neu20": cfg(S, adam=0.01, method="neumann", terms=20, eta=0.1, weight_decay=5e-4),
    "adam_0.01_cg5_d0.01": cfg(S, adam=0.01, method="cg", cg_iterations=5, damping=0.01),
    "adam_0.01_cg10_d0.01": cfg(S, adam=0.01, method="cg", cg_iterations=10, damping=0.01),
    "adam_0.01_cg5_d0.001": cfg(S, adam=0.01, method="cg", cg_iterations=5, damping=0.001),
    "adam_0.01_cg5_d0.1": cfg(S, adam=0.01, method="cg", cg_iterations=5, damping=0.1),
    # tables
    "adam_0.01_offset": cfg(S, adam=0.01, search="offset"),
    "adam_0.01_dow": cfg(S, adam=0.01, search="delta,offset,weight"),
    "adam_0.01_weight": cfg(S, adam=0.01, search="weight"),
    "adam_0.01_dataset": cfg(S, adam=0.01, param="dataset", search="offset"),
    "adam_0.01_dataset_do": cfg(S, adam=0.01, param="dataset"),
    # start from CE
    "ce_adam_0.01_offset": cfg(S, preset="ce", adam=0.01, search="offset"),
    "ce_adam_0.01_dataset": cfg(S, preset="ce", adam=0.01, param="dataset", search="offset"),
    # model-side fix of the saturation: a cosine head with a fixed scale
    "cos_adam_0.01": cfg(S, adam=0.01, cos=16.0),
    "cos_ce_adam_0.01_offset": cfg(S, preset="ce", adam=0.01, search="offset", cos=16.0),
}

MODEL_KEYS = ("preset", "search", "param", "cos", "augment", "adam", "sgd", "baseline", "tau", "gamma", "group_size",
              "hyper_cosine", "library", "one_phase")


ESTIMATOR_KEYS = ("method", "eta", "terms", "damping", "cg_iterations", "curvature", "product", "weight_decay")


def _with_estimator(kw: dict[str, Any]) -> dict[str, Any]:
    """The estimator's settings gathered into AutoBalanceCallback's ``estimator``."""
    settings = {k: kw.pop(k) for k in ESTIMATOR_KEYS if k in kw}
    if settings:
        kw["estimator"] = Estimator(**settings)
    return kw


def callback_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("library"):
        return _with_estimator({k: v for k, v in config.items() if k not in MODEL_KEYS})
    merged = {**CURRENT, **config}
    kw = _with_estimator({k: v for k, v in merged.items() if k not in MODEL_KEYS})
    if config.get("adam") is not None:
        lr = float(config["adam"])
        kw["hyper_optimizer"] = lambda params: torch.optim.Adam(params, lr=lr)
    else:
        lr = float(merged["sgd"])
        kw["hyper_optimizer"] = lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)
    return kw


def parse_extra(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values parsed as JSON when possible) for an ad-hoc config."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=callbacks)


def datamodule(args: argparse.Namespace, seed: int, search: bool, augment: bool,
               fold_in_epoch: int | None = None) -> HeldOutDigits:
    return HeldOutDigits(val_per_class=args.val_per_class, val_seed=args.val_seed,
                         test_per_class=args.test_per_class, test_seed=0, imbalance_ratio=args.rho,
                         search_split=search, batch_size=args.batch_size, seed=seed, val_source="none",
                         augment=augment, fold_in_epoch=fold_in_epoch)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(optimizer=functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9, weight_decay=args.wd))


@torch.no_grad()
def balanced_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, list[float]]:
    model.eval()
    pred = model(x).argmax(-1)
    per_class = [float((pred[y == c] != c).float().mean()) for c in range(k)]
    return float(np.mean(per_class)), per_class


def run_one(name: str, config: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    t0 = time.time()
    augment = bool(config.get("augment", False))
    network = make_network(config.get("cos"))
    out: dict[str, Any] = {"config": name, "seed": seed}
    full = datamodule(args, seed, search=False, augment=augment)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if "baseline" in config:
            pl.seed_everything(seed, verbose=False)
            model = ImbalancedClassifier(network, num_classes=full.num_classes, class_counts=full.class_counts,
                                         preset=config["baseline"], search=(),
                                         preset_kwargs={k: config[k] for k in ("tau", "gamma") if k in config} or None,
                                         **model_kwargs(args))
            trainer(args.epochs, []).fit(model, datamodule=full)
        elif "one_phase" in config:
            # One fit: the library's defaults, search until the fold-in, then everything with the loss frozen.
            fold = fold_in_epoch(args.epochs, config["one_phase"])
            dm = datamodule(args, seed, search=True, augment=augment, fold_in_epoch=fold)
            pl.seed_everything(seed, verbose=False)
            model = ImbalancedClassifier(network, num_classes=dm.num_classes, class_counts=dm.class_counts,
                                         preset=config.get("preset", "la"), **model_kwargs(args))
            cb = AutoBalanceCallback(seed=seed, **callback_kwargs(config))
            trainer(args.epochs, [cb]).fit(model, datamodule=dm)
            out.update(hyper_steps=cb.hyper_steps, fold_in_epoch=fold,
                       scalars={k: float(v) for k, v in model.autobalance.alpha().items() if v.numel() == 1})
        else:
            dm = datamodule(args, seed, search=True, augment=augment)
            pl.seed_everything(seed, verbose=False)
            searched = tuple(config.get("search", "delta,offset").replace("+", ",").split(","))
            model = ImbalancedClassifier(network, num_classes=dm.num_classes, class_counts=dm.class_counts,
                                         preset=config.get("preset", "la"), search=searched,
                                         parametrization=config.get(
                                             "param", "hierarchical" if config.get("library") else "class"),
                                         group_size=config.get("group_size", 1), **model_kwargs(args))
            start = [t.detach().double().clone() for t in model.autobalance.tables()]
            kw = callback_kwargs(config)
            if config.get("hyper_cosine"):  # anneal the hyper learning rate to 0 over the hyper steps of the search
                total = math.ceil(len(dm.train_dataset) / args.batch_size) * args.search_epochs
                n_hyper = max((total - int(kw["warmup_fraction"] * total)) // kw["every_n_steps"], 1)
                kw["hyper_scheduler"] = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_hyper)
            cb = AutoBalanceCallback(seed=seed, **kw)
            trainer(args.search_epochs, [cb]).fit(model, datamodule=dm)
            end = [t.detach().double() for t in model.autobalance.tables()]
            finite = all(bool(torch.isfinite(t).all()) for t in end)
            log_pi = torch.log(torch.tensor(dm.class_counts, dtype=torch.float64) / sum(dm.class_counts))
            d_off = (end[1] - start[1])[0]
            d_off = d_off - d_off.mean()
            lp = log_pi - log_pi.mean()
            out.update(hyper_steps=cb.hyper_steps, skipped=cb.skipped_steps, finite=finite,
                       # slope of the offset change against log(pi): +1 would be a full step towards LA from CE
                       offset_slope=float((d_off * lp).sum() / (lp * lp).sum()),
                       tail_offset_change=float(d_off[-1]),
                       delta=end[0][0].tolist(), offset=end[1][0].tolist(), weight=end[2][0].tolist(),
                       delta_range=float(end[0].max() / end[0].min()),
                       scalars={k: float(v) for k, v in model.autobalance.alpha().items() if v.numel() == 1})
            if not finite:
                out.update(val=math.nan, test=math.nan, seconds=time.time() - t0)
                return out
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "loss.json")
                model.export_loss(path)
                if args.rebase:
                    # Not what the library does today (see docs/tuning.md): re-express the searched loss on the
                    # retraining counts, i.e. the preset rebuilt from the whole set's counts plus the searched
                    # deviation from it (per-class alpha, or gamma/tau/omega), instead of absolute tables that
                    # carry the search split's priors.
                    ab = model.autobalance
                    rebased = build_parametrization(ab.kind, full.class_counts, preset=ab.preset, search=ab.search,
                                                    group_size=config.get("group_size", 1),
                                                    preset_kwargs=ab.preset_kwargs or None)
                    with torch.no_grad():
                        for k, v in ab.alpha().items():
                            rebased.alpha()[k].copy_(v)
                        tables = rebased.retraining_tables()
                    save_loss_tables(path, tables, reduction=model.autobalance_reduction)
                pl.seed_everything(seed, verbose=False)
                model = ImbalancedClassifier(network, num_classes=full.num_classes, class_counts=full.class_counts,
                                             loss_file=path, **model_kwargs(args))
                trainer(args.epochs, []).fit(model, datamodule=full)
    k = full.num_classes
    out["val"], out["val_per_class"] = balanced_error(model, *full.eval_tensors("val"), k)
    if args.test:
        out["test"], out["test_per_class"] = balanced_error(model, *full.eval_tensors("test"), k)
    out["seconds"] = time.time() - t0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan


def fmt(m: float, s: float, scale: float = 100.0) -> str:
    if math.isnan(m):
        return "nan"
    return f"{scale * m:6.2f} ± {scale * s:4.2f}"


def table(results: list[dict[str, Any]], names: list[str], reference: str | None, key: str) -> str:
    by = {n: {r["seed"]: r for r in results if r["config"] == n} for n in names}
    ref = by.get(reference or "", {})
    head = f"| config | n | {key} bal. err % | paired diff vs {reference} (pp) | tail offset change | " \
           f"offset slope vs log pi | delta max/min | NaN runs | s/run |"
    lines = [head, "|" + "---|" * 9]
    for n in names:
        rs = list(by[n].values())
        vals = [r[key] for r in rs if key in r]
        m, s = mean_se([v for v in vals if not math.isnan(v)])
        diffs = [r[key] - ref[r["seed"]][key] for r in rs if r["seed"] in ref and not math.isnan(r[key])]
        dm, ds = mean_se(diffs) if diffs and n != reference else (math.nan, math.nan)
        tail = mean_se([r["tail_offset_change"] for r in rs if "tail_offset_change" in r])
        slope = mean_se([r["offset_slope"] for r in rs if "offset_slope" in r])
        dr = [r["delta_range"] for r in rs if "delta_range" in r]
        nan = sum(1 for r in rs if not r.get("finite", True) or r.get("skipped", 0) > 0 or math.isnan(r[key]))
        sec = np.mean([r["seconds"] for r in rs])
        lines.append(f"| {n} | {len(vals)} | {fmt(m, s)} | {fmt(dm, ds)} | "
                     f"{'-' if math.isnan(tail[0]) else f'{tail[0]:+.3f} ± {tail[1]:.3f}'} | "
                     f"{'-' if math.isnan(slope[0]) else f'{slope[0]:+.3f} ± {slope[1]:.3f}'} | "
                     f"{'-' if not dr else f'{np.median(dr):.2f}'} | {nan} | {sec:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=["ce", "la", "default"], help="names from --list")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME:key=value,key=value",
                   help="ad-hoc configs, e.g. 'mine:adam=0.01,every_n_steps=2,preset=la,search=offset'")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=40, help="retraining (and baseline) epochs")
    p.add_argument("--search-epochs", type=int, default=40)
    p.add_argument("--rho", type=float, default=100.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--val-seed", type=int, default=1)
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--test", action="store_true", help="also evaluate on the test set (only for the final report)")
    p.add_argument("--rebase", action="store_true",
                   help="retrain with the searched deviation applied to the preset rebuilt from the retraining counts")
    p.add_argument("--reference", default="la", help="config the paired differences are taken against")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None, help="append every run's record to this JSON-lines file")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    configs = dict(CONFIGS)
    for item in args.extra:
        name, _, spec = item.partition(":")
        configs[name] = cfg(S, **parse_extra([s for s in spec.split(",") if s]))
    if args.list:
        for n, c in configs.items():
            print(f"{n:28s} {c}")
        return
    names = list(dict.fromkeys(args.configs + [item.partition(":")[0] for item in args.extra]))
    if args.reference and args.reference not in names:
        names.insert(0, args.reference)
    jobs = [(n, configs[n], s) for n in names for s in args.seeds]
    results: list[dict[str, Any]] = []
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, n, c, s, args) for n, c, s in jobs]
        for f in futures:
            r = f.result()
            results.append(r)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
            print(f"  {r['config']:26s} seed {r['seed']}: val {100 * r['val']:.2f}"
                  + (f" test {100 * r['test']:.2f}" if "test" in r else "")
                  + (f" tail_off {r['tail_offset_change']:+.2f}" if "tail_offset_change" in r else "")
                  + (f" steps {r['hyper_steps']}" if "hyper_steps" in r else "")
                  + f" ({r['seconds']:.1f}s)", file=sys.stderr, flush=True)
    print(f"\n{len(jobs)} runs in {time.time() - t0:.0f} s; seeds {args.seeds}; "
          f"epochs search {args.search_epochs} / retrain {args.epochs}\n")
    print(table(results, names, args.reference, "val"))
    if args.test:
        print()
        print(table(results, names, args.reference, "test"))


if __name__ == "__main__":
    main()
