"""Does the held-back check's verdict predict the retrained model? (issue 32, item 2: measure the decision.)

At the end of a search the held-back check (:mod:`lightning_autobalance.lightning.check`) trains the classifier head
to its equilibrium on the search model's features once with the found loss and once with the start loss, scores both
heads with the upper objective (balanced cross-entropy) on a held-back half of the upper split, and keeps the found loss
only when it wins. The question it stands in for: *retrained with the found loss, does the network do better than
retrained with the start loss?* This script answers that question directly, on validation data only, for every seed:

1. the pipeline's search (``benchmarks/quality.py``'s runs folder and commands, reused when finished);
2. the check's verdict and its two figures, read from the search's log (``autobalance/check_start``,
   ``autobalance/check_found`` in ``search/logs/metrics.csv``);
3. the loss the search **found** before the check ruled on it: the loss parameters' per-class tables logged after
   the last hyper step (``autobalance/<table>/<class>`` in the same log). When the check put the start back, the
   search's ``found_loss.yaml`` and ``last.ckpt`` hold the start; the log still holds what was found;
4. the held-back samples, chosen again as the callback chose them
   (:func:`~lightning_autobalance.lightning.check.holdout_split` on the upper split's labels, the callback's
   ``holdout`` share and ``seed``);
5. a replay of the check on the search's ``last.ckpt`` with those samples and those two losses: it must give the
   logged figures back (exactly without augmentation; with augmented training images up to the augmentation's
   random draws), which verifies 3 and 4;
6. two twins of the search model: the same network, split, epochs, optimizer and seed, trained on the lower split
   (the search's 80% part) with the start loss frozen and with the found loss frozen (no hyper step), each scored
   on the held-back samples (balanced cross-entropy, the check's objective, and balanced error), on the rest of the
   upper split and on the test set.

The check **agrees** on a seed when "found kept" (found figure < start figure) coincides with "the found twin has the
lower balanced error on the held-back samples" (also reported: agreement judged by balanced cross-entropy). The issue's
target counts the *decisive* seeds, those whose twins differ by more than ``--margin`` points of balanced error on the
held-back samples: agreement on at least 9 of 10 of them.

Writes ``<docs-dir>/<name>.md`` (the command at the top, the per-seed table, the agreement) and ``<name>.json``; each
seed's twins and replay under ``<runs-dir>/<name>/seed_<s>/decision/``. Finished pieces are reused on rerun.

Example::

    python benchmarks/decision.py --config examples/digits_lt.yaml --seeds 0 1 2 3 4 --threads 1
    python benchmarks/decision.py --config benchmarks/configs/terminal_phase.yaml --name terminal_phase_augment \\
        --seeds 0 1 2 --threads 1 --set=--data.init_args.train_augment=true
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

# The package, in one block (its module paths are about to move: fix them here).
from lightning_autobalance import AutoBalanceCallback
from lightning_autobalance.core.head import find_head, head_parameters, optimizer_head_weight_decay
from lightning_autobalance.core.losses import LossTables, save_loss_tables
from lightning_autobalance.lightning.check import (
    AUTO_HOLDOUT,
    FIT_TOLERANCE,
    TRAIN_ROWS,
    compare_losses,
    holdout_split,
    read_features,
    training_error,
)
from lightning_autobalance.runner.pipeline import _clone, _counts, _data

ROOT = quality.ROOT


def _cli() -> list[str]:
    """The CLI as ``python -m``: the package this interpreter imports runs the pipeline too (an installed
    ``lightning-autobalance`` script may belong to another checkout of the package)."""
    return [sys.executable, "-m", "lightning_autobalance.runner.cli"]


quality._cli = _cli  # quality.run_seed starts its pipelines through this
TABLES = ("delta", "offset", "weight")
#: bumped when what a twin's result.json holds changes (older ones are trained again)
TWIN_VERSION = 2
#: replays of the check with fresh augmentation draws (where the data is augmented)
REPLAYS = 3
#: the default margin (points of balanced error on the held-back samples) above which a seed is decisive
MARGIN = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping (pure functions; tests/test_decision.py)
# ----------------------------------------------------------------------------------------------------------------


def last_check(rows: Sequence[Mapping[str, str]]) -> tuple[float, float] | None:
    """``(start, found)`` of the last row of a search's ``metrics.csv`` that logged the held-back check, or ``None``."""
    for row in reversed(rows):
        start, found = row.get("autobalance/check_start", ""), row.get("autobalance/check_found", "")
        if start not in ("", None) and found not in ("", None):
            return float(start), float(found)
    return None


def found_tables_from_log(rows: Sequence[Mapping[str, str]], start: Mapping[str, Sequence[float]],
                          num_classes: int) -> tuple[dict[str, list[float]], int]:
    """The loss tables after the last hyper step, from a search's ``metrics.csv`` rows (one group of classes).

    Every table the search logged per class (``autobalance/<table>/<class>``) is taken from the last row that has
    it; a table it did not log (not searched) is the start's. Returns ``(tables, step)``.

    Raises:
        ValueError: no hyper step logged per-class values (nothing searched, or the log gave summaries only: more
            classes than the callback's ``log_max_classes``), or a row misses a class.
    """
    width = len(str(num_classes - 1))
    logged = {name: [f"autobalance/{name}/{c:0{width}d}" for c in range(num_classes)] for name in TABLES}
    searched = [name for name, cols in logged.items() if rows and cols[0] in rows[0]]
    if not searched:
        raise ValueError("the search's log has no per-class loss tables (autobalance/<table>/<class>)")
    tables = {name: [float(v) for v in start[name]] for name in TABLES}
    step = -1
    for name in searched:
        last = next((r for r in reversed(rows) if r.get(logged[name][0], "") not in ("", None)), None)
        if last is None:
            raise ValueError(f"the search's log has no value of {logged[name][0]}")
        values = [last.get(col, "") for col in logged[name]]
        if any(v in ("", None) for v in values):
            raise ValueError(f"the last logged {name} table misses classes")
        tables[name] = [float(v) for v in values]
        step = max(step, int(float(last.get("step", -1) or -1)))
    return tables, step


def balanced_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Balanced cross-entropy (the mean over present classes of the per-class mean cross-entropy: the upper
    objective ``balanced_ce``) and balanced error (the same mean of per-class error), in float64."""
    logits, labels = logits.double(), labels.long()
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    wrong = (logits.argmax(-1) != labels).double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    ce_sum = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, ce)
    err_sum = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, wrong)
    present = counts > 0
    per_class_error = err_sum / counts.clamp_min(1)
    return {"balanced_ce": float((ce_sum[present] / counts[present]).mean()),
            "balanced_error": float(per_class_error[present].mean()),
            "per_class_error": per_class_error.tolist(), "counts": counts.long().tolist(),
            "samples": int(labels.numel())}


def judge(check_start: float, check_found: float, start_twin: Mapping[str, float], found_twin: Mapping[str, float],
          margin: float = MARGIN) -> dict[str, Any]:
    """One seed's verdict against the retrained outcome.

    Args:
        check_start, check_found: the check's two figures (the found loss is kept when ``check_found < check_start``).
        start_twin, found_twin: the twins' ``balanced_ce`` and ``balanced_error`` (fractions) on the held-back samples.
        margin: points of balanced error above which the twins' difference is decisive.

    Returns:
        ``kept`` (the check's verdict), ``found_better_error`` / ``found_better_ce`` (the retrained outcome),
        ``diff_error_pp`` (found twin minus start twin, points) and ``diff_ce``, ``agree_error`` (``None`` when the
        twins tie in balanced error: the held-back samples do not tell them apart) / ``agree_ce``, ``decisive``
        (``|diff_error_pp| > margin``) and ``check_margin`` (start minus found figure).
    """
    kept = check_found < check_start
    diff_error = 100.0 * (found_twin["balanced_error"] - start_twin["balanced_error"])
    diff_ce = found_twin["balanced_ce"] - start_twin["balanced_ce"]
    better_error, better_ce = diff_error < 0, diff_ce < 0
    tie = round(diff_error, 9) == 0
    return {"kept": kept, "check_margin": check_start - check_found, "found_better_error": better_error,
            "found_better_ce": better_ce, "diff_error_pp": diff_error, "diff_ce": diff_ce,
            "agree_error": None if tie else kept == better_error, "agree_ce": kept == better_ce,
            "decisive": abs(round(diff_error, 9)) > margin}  # rounded: 100 * (0.305 - 0.300) is 0.5000000000000004


def paired_bootstrap(start_wrong: torch.Tensor, found_wrong: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """How well the held-back samples resolve the twins' difference: a paired bootstrap, stratified per class (each
    class resampled with replacement to its own size, so every class present stays present), of the found twin's
    balanced error minus the start twin's, in points.

    Args:
        start_wrong, found_wrong: ``(N,)`` 0/1 per held-back sample (misclassified by each twin).
        labels: ``(N,)`` their classes.
        num_classes: ``K``.
        draws, seed: bootstrap draws and their seed.

    Returns:
        ``lo``, ``hi`` (the 5% and 95% quantiles) and ``p_found_better`` (the share of draws where the found twin's
        balanced error is strictly lower).
    """
    gen = torch.Generator().manual_seed(seed)
    diff = (found_wrong.double() - start_wrong.double())
    total = torch.zeros(draws, dtype=torch.float64)
    present = 0
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        present += 1
        pick = torch.randint(members.numel(), (draws, members.numel()), generator=gen)
        total += diff[members][pick].mean(1)
    total = 100.0 * total / max(present, 1)
    lo, hi = torch.quantile(total, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    return {"lo": lo, "hi": hi, "p_found_better": float((total < 0).double().mean())}


def summarize(judged: Sequence[Mapping[str, Any]], target: float = 0.9) -> dict[str, Any]:
    """Agreement over seeds: all seeds (by balanced error and by balanced cross-entropy), the decisive ones, and
    whether the decisive agreement reaches ``target`` (9 of 10); the cost of each disagreement (points of balanced
    error the check's choice loses against the other twin)."""
    decisive = [j for j in judged if j["decisive"]]
    agree_decisive = sum(j["agree_error"] is True for j in decisive)
    costs = [abs(j["diff_error_pp"]) for j in judged if j["agree_error"] is False]
    return {"cases": len(judged), "agree_error": sum(j["agree_error"] is True for j in judged),
            "ties": sum(j["agree_error"] is None for j in judged),
            "agree_ce": sum(j["agree_ce"] for j in judged), "decisive": len(decisive),
            "agree_decisive": agree_decisive,
            "target_met": bool(decisive) and agree_decisive >= math.ceil(target * len(decisive) - 1e-9),
            "kept": sum(j["kept"] for j in judged), "found_better_error": sum(j["found_better_error"] for j in judged),
            "disagreement_cost_pp": costs}


# ----------------------------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------------------------


def metrics_files(log_dir: Path) -> list[Path]:
    """A stage's ``metrics.csv`` files in the order they were written: a resumed stage moves the earlier attempts'
    aside as ``metrics.1.csv``, ``metrics.2.csv``, ... before it logs to a new ``metrics.csv``."""
    earlier = sorted((p for p in log_dir.glob("metrics.*.csv") if p.stem.split(".")[-1].isdigit()),
                     key=lambda p: int(p.stem.split(".")[-1]))
    return [*earlier, *([log_dir / "metrics.csv"] if (log_dir / "metrics.csv").is_file() else [])]


def _read_csv(log_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in metrics_files(log_dir):
        with path.open(newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def _search_callback(trainer_kwargs: Mapping[str, Any]) -> AutoBalanceCallback:
    callbacks = trainer_kwargs.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    found = [c for c in callbacks if isinstance(c, AutoBalanceCallback)]
    return found[0] if found else AutoBalanceCallback()  # the pipeline adds a default one otherwise


def _upper_labels(split: Any) -> torch.Tensor:
    """The upper split's labels in dataset order, as the callback reads them (the datamodule's ``upper_targets``)."""
    targets = split.upper_targets
    if targets is None or len(targets) != len(split.upper_dataset):
        raise RuntimeError("the datamodule gives no upper_targets for its upper split")
    return torch.as_tensor(targets).long()


def _logits(model: Any, dataset: Any, loader_like: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the labels over ``dataset`` in order (evaluation mode, no gradient)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=loader_like.batch_size or 256,
                                         collate_fn=loader_like.collate_fn)
    model.eval()
    out, labels = [], []
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0], batch[1]
            out.append(model(x).double().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    return torch.cat(out), torch.cat(labels)


def _tables_hash(tables: Mapping[str, Sequence[float]]) -> str:
    return hashlib.sha256(json.dumps({k: list(tables[k]) for k in TABLES}).encode()).hexdigest()[:16]


def _write_loss(path: Path, tables: Mapping[str, Sequence[float]], what: str) -> Path:
    """A loss file with absolute tables only (no parametrisation): :func:`loss_from_file` uses them as they are,
    which on the search's own split (the twins' data) is exactly the loss the search trained with."""
    lt = LossTables(*(torch.tensor([list(tables[k])], dtype=torch.float64) for k in TABLES))
    return save_loss_tables(path, lt, reduction="mean", note=what)


def train_twin(config: Path, seed: int, out: Path, tables: Mapping[str, Sequence[float]], what: str,
               held: torch.Tensor, extra: Sequence[str], split: Any, full: Any, view: Any) -> dict[str, Any]:
    """The search's network trained on its lower split for the search's epochs with ``tables`` frozen (no hyper
    step, no callback), as ``quality.py --search-model``'s fixed-start twin; scored on the held-back samples
    (``held``: indices into the upper split), on the rest of the upper split and on the test set.

    ``held_back`` scores the upper images as they are (``view.val_dataset``: the upper split without augmentation);
    ``held_back_as_check`` scores them as the check reads them (``split.upper_dataset``, which applies the training
    augmentation when the datamodule's ``upper_augment`` is on: one random draw)."""
    key = _tables_hash(tables)
    done = out / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("tables_hash") == key and result.get("version") == TWIN_VERSION:
            return result
    import pytorch_lightning as pl

    model_t, _, trainer_kwargs, pipe = quality._templates(config, seed, tuple(extra))
    epochs = pipe.get("search_epochs") or trainer_kwargs.get("max_epochs")
    loss_file = _write_loss(out / "loss.yaml", tables, what)
    pl.seed_everything(seed, workers=True, verbose=False)  # as every pipeline stage does (its split is built before)
    model = _clone(model_t, **_counts(model_t, split), loss="autobalance", search=(), loss_file=str(loss_file),
                   freeze_loss=True)
    trainer = quality.plain_trainer(trainer_kwargs, epochs, out)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=split)
    fit_time = time.perf_counter() - t0
    k = split.num_classes
    upper_logits, upper_labels = _logits(model, view.val_dataset, split.upper_dataloader())
    torch.manual_seed(seed)  # the augmentation draw of the check's view
    seen_logits, seen_labels = _logits(model, split.upper_dataset, split.upper_dataloader())
    for labels in (upper_labels, seen_labels):
        if not torch.equal(labels, _upper_labels(split)):
            raise RuntimeError("the upper split's labels read back differ from upper_targets")
    rest = torch.ones(upper_labels.numel(), dtype=torch.bool)
    rest[held] = False
    test_logits, test_labels = _logits(model, full.test_dataset, full.test_dataloader())
    result = {"version": TWIN_VERSION, "what": what, "tables": {n: list(tables[n]) for n in TABLES},
              "tables_hash": key, "epochs": epochs, "train_images": int(sum(split.class_counts)),
              "fit_time_s": fit_time,
              "held_back": balanced_scores(upper_logits[held], upper_labels[held], k),
              "held_back_as_check": balanced_scores(seen_logits[held], seen_labels[held], k),
              "upper_rest": balanced_scores(upper_logits[rest], upper_labels[rest], k),
              "upper_all": balanced_scores(upper_logits, upper_labels, k),
              "test": balanced_scores(test_logits, test_labels, full.num_classes)}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"upper_logits": upper_logits, "upper_logits_as_check": seen_logits, "upper_labels": upper_labels,
                "held": held}, out / "upper_logits.pt")
    torch.save(model.state_dict(), out / "model.pt")
    done.write_text(json.dumps(result, indent=2))
    return result


def replay_check(config: Path, seed: int, out: Path, start: Mapping[str, Sequence[float]],
                 found: Mapping[str, Sequence[float]], held: torch.Tensor, extra: Sequence[str],
                 split: Any, view: Any, network: Path | None = None) -> dict[str, Any]:
    """The held-back check again, on the search's ``last.ckpt`` (the model the check saw: it runs before the last
    epoch's checkpoint), with the held-back samples chosen here and the two losses recovered here.

    ``draws``: :data:`REPLAYS` replays as the check reads its data (training features from the training loader,
    held-back images from the upper dataset: both augmented where the datamodule augments them, each replay with its
    own random draws); ``clean``: the held-back images without augmentation (``view.val_dataset``).

    ``network``: another network's weights (a twin's ``model.pt``) in place of the search model's: the same check on
    features that were not trained with the found loss."""
    import pytorch_lightning as pl

    model_t, _, trainer_kwargs, _ = quality._templates(config, seed, tuple(extra))
    callback = _search_callback(trainer_kwargs)
    pl.seed_everything(seed, workers=True, verbose=False)
    model = _clone(model_t, **_counts(model_t, split), loss="autobalance")
    state = torch.load(out / "search" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    if network is not None:  # the network's weights only: the loss parameters stay the search's
        weights = torch.load(network, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("autobalance.")}, strict=False)
    with torch.no_grad():  # the loss the checkpoint holds: the found one when kept, the start when put back
        held_tables = model.autobalance_parameters().tables()
    ckpt = {n: getattr(held_tables, n)[0].double() for n in TABLES}
    gap = {w: max(float((ckpt[n] - torch.tensor(list(t[n]), dtype=torch.float64)).abs().max()) for n in TABLES)
           for w, t in (("start", start), ("found", found))}
    head = callback.estimator.head
    wd = callback.estimator.weight_decay if callback.estimator.method == "head" else 0.0
    if not wd:
        optimizer = model.optimizer_fn([p for p in model.parameters() if p.requires_grad])
        wd = optimizer_head_weight_decay(model, optimizer.param_groups, head)[1] or 0.0
    name = find_head(model, head)
    layer = dict(model.named_modules())[name]
    upper = split.upper_dataloader()
    tables = [LossTables(*(torch.tensor([list(t[n])], dtype=torch.float32) for n in TABLES)) for t in (start, found)]

    def once(held_dataset: Any) -> tuple[float, float, int]:
        held_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(held_dataset, held.tolist()),
                                                  batch_size=upper.batch_size, collate_fn=upper.collate_fn)
        train = read_features(model, layer, split.train_dataloader(), model.autobalance_unpack,
                              model.autobalance_forward)
        check = read_features(model, layer, held_loader, model.autobalance_unpack, model.autobalance_forward)
        counts = torch.bincount(check[1], minlength=split.num_classes).clamp_min(1).tolist()
        objective = callback.objective.build(counts, None, validate=False)
        values = compare_losses(*train, *check, tables, model.autobalance_loss_from_tables, objective,
                                head_parameters(layer.weight, layer.bias), layer.weight.shape[0],
                                layer.bias is not None, wd, 10)
        return float(values[0]), float(values[1]), int(check[1].numel())

    draws = []
    for r in range(REPLAYS):
        torch.manual_seed(1000 * seed + r)
        draws.append(once(split.upper_dataset)[:2])
    torch.manual_seed(seed)
    clean = once(view.val_dataset)
    return {"start": draws[0][0], "found": draws[0][1], "draws": [list(d) for d in draws],
            "clean": list(clean[:2]), "weight_decay": wd, "samples": clean[2],
            "checkpoint_loss_minus_start": gap["start"], "checkpoint_loss_minus_found": gap["found"]}


def start_tables(config: Path, seed: int, extra: Sequence[str], split: Any) -> dict[str, list[float]]:
    """The start loss's tables on the search split (the module's loss before any hyper step)."""
    model_t, _, _, _ = quality._templates(config, seed, tuple(extra))
    model = _clone(model_t, **_counts(model_t, split), loss="autobalance")
    params = model.autobalance_parameters()
    if params.num_groups != 1:
        raise SystemExit("decision.py handles one group of classes (no group-wise loss)")
    with torch.no_grad():
        tables = params.tables()
    return {n: getattr(tables, n)[0].double().tolist() for n in TABLES}


def search_training_error(config: Path, seed: int, out: Path, extra: Sequence[str]) -> float:
    """What the check's fit rule measures, on the search's ``last.ckpt`` with the loss the search found (from its
    log): the balanced error of the model's own head on the training rows the check reads (augmented where the data
    is), logits seen through the found loss (:func:`~lightning_autobalance.lightning.check.training_error`). Runs no
    training: one forward pass over the lower split."""
    import pytorch_lightning as pl

    model_t, dm_t, trainer_kwargs, _ = quality._templates(config, seed, tuple(extra))
    split = _data(dm_t, search_split=True)
    split.setup("fit")
    rows = _read_csv(out / "search" / "logs")
    start = start_tables(config, seed, extra, split)
    found, _ = found_tables_from_log(rows, start, split.num_classes)
    pl.seed_everything(seed, workers=True, verbose=False)
    model = _clone(model_t, **_counts(model_t, split), loss="autobalance")
    state = torch.load(out / "search" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    layer = dict(model.named_modules())[find_head(model, _search_callback(trainer_kwargs).estimator.head)]
    torch.manual_seed(1000 * seed)
    features, target, group = read_features(model, layer, split.train_dataloader(), model.autobalance_unpack,
                                            model.autobalance_forward, max_rows=TRAIN_ROWS)
    tables = LossTables(*(torch.tensor([list(found[n])], dtype=torch.float64) for n in TABLES))
    with torch.no_grad():
        logits = torch.nn.functional.linear(features, layer.weight, layer.bias).double()
    return float(training_error(logits, target, group, tables))


def with_training_error(config: Path, seed: int, out: Path, extra: Sequence[str]) -> None:
    """Adds ``training_error`` (:func:`search_training_error`) to the seed's ``decision/replay.json`` if missing."""
    path = out / "decision" / "replay.json"
    replay = json.loads(path.read_text())
    if "training_error" not in replay:
        replay["training_error"] = search_training_error(config, seed, out, extra)
        path.write_text(json.dumps(replay, indent=2))


def run_one(config: Path, seed: int, out: Path, extra: Sequence[str], env: dict[str, str],
            margin: float) -> dict[str, Any]:
    commands = quality.run_seed(config, seed, out, [quality.AUTOBALANCE], extra, env)
    if not (out / "search" / "result.json").is_file():
        return {"seed": seed, "failure": f"the search did not finish; see {out / 'pipeline.log'}"}
    rows = _read_csv(out / "search" / "logs")
    if last_check(rows) is None:
        return {"seed": seed, "failure": "the search's log has no held-back check (autobalance/check_*)"}
    _, dm_t, trainer_kwargs, _ = quality._templates(config, seed, tuple(extra))
    split = _data(dm_t, search_split=True)  # the search stage's datamodule, built once for every use below
    split.setup("fit")
    view = _clone(dm_t, search_split=True, val_source="upper")  # the same upper split, also without augmentation
    view.setup("fit")
    if view.upper_targets != split.upper_targets:
        raise RuntimeError("the evaluation datamodule's upper split differs from the search's")
    start = start_tables(config, seed, extra, split)
    found, _ = found_tables_from_log(rows, start, split.num_classes)
    callback = _search_callback(trainer_kwargs)
    share = AUTO_HOLDOUT if callback.upper.holdout is None else callback.upper.holdout
    _, held = holdout_split(_upper_labels(split), share, seed=callback.seed, num_classes=split.num_classes)
    dec = out / "decision"
    dec.mkdir(parents=True, exist_ok=True)
    replay_path = dec / "replay.json"
    replay = json.loads(replay_path.read_text()) if replay_path.is_file() else None
    if replay is None or replay.get("found_hash") != _tables_hash(found) or "clean" not in replay:
        replay = {**replay_check(config, seed, out, start, found, held, extra, split, view),
                  "found_hash": _tables_hash(found)}
        replay_path.write_text(json.dumps(replay, indent=2))
    full = _data(dm_t, search_split=False)
    full.setup("test")
    t0 = time.perf_counter()
    for w, t in (("start", start), ("found", found)):
        train_twin(config, seed, dec / f"{w}_twin", t, f"{w} loss, frozen", held, extra, split, full, view)
    on_start = dec / "check_on_start_twin.json"
    if not on_start.is_file() or json.loads(on_start.read_text()).get("found_hash") != _tables_hash(found):
        on_start.write_text(json.dumps({**replay_check(config, seed, out, start, found, held, extra, split, view,
                                                       dec / "start_twin" / "model.pt"),
                                        "found_hash": _tables_hash(found)}, indent=2))
    print(f"[seed {seed}] twins done in {time.perf_counter() - t0:.0f} s", flush=True)
    with_training_error(config, seed, out, extra)
    return collect_one(out, seed, margin, commands["all"])


def collect_one(out: Path, seed: int, margin: float, command: str) -> dict[str, Any]:
    """One seed's record from what :func:`run_one` left on disk (the search's log and result, the replay, the
    twins' results and logits); the verdicts are judged anew (``--report-only`` reruns only this)."""
    dec = out / "decision"
    rows = _read_csv(out / "search" / "logs")
    figures = last_check(rows)
    if figures is None or not all((dec / f"{w}_twin" / "result.json").is_file() for w in ("start", "found")):
        return {"seed": seed, "failure": "not finished (no held-back check in the search's log, or a twin missing)"}
    check_start, check_found = figures
    twins = {w: json.loads((dec / f"{w}_twin" / "result.json").read_text()) for w in ("start", "found")}
    start, found = twins["start"]["tables"], twins["found"]["tables"]
    num_classes = len(start["offset"])
    _, step = found_tables_from_log(rows, start, num_classes)
    replay = json.loads((dec / "replay.json").read_text())
    on_start = dec / "check_on_start_twin.json"
    on_start_twin = json.loads(on_start.read_text()) if on_start.is_file() else None
    verdict = judge(check_start, check_found, twins["start"]["held_back"], twins["found"]["held_back"], margin)
    saved = {w: torch.load(dec / f"{w}_twin" / "upper_logits.pt", weights_only=True) for w in ("start", "found")}
    held = saved["start"]["held"]
    labels = saved["start"]["upper_labels"][held]
    wrong = {w: (v["upper_logits"][held].argmax(-1) != labels) for w, v in saved.items()}
    noise = paired_bootstrap(wrong["start"], wrong["found"], labels, num_classes, seed=seed)
    as_check = judge(check_start, check_found, twins["start"]["held_back_as_check"],
                     twins["found"]["held_back_as_check"], margin)
    search = json.loads((out / "search" / "result.json").read_text())
    return {"seed": seed, "command": command, "check_start": check_start, "check_found": check_found,
            "replay": replay, "check_on_start_twin": on_start_twin, "held_back_samples": int(held.numel()),
            "found_step": step,
            "hyper_steps": search.get("hyper_steps"), "search_time_s": search.get("fit_time_s"),
            "start_tables": start, "found_tables": found,
            "twins": {w: {k: v for k, v in t.items() if k != "tables"} for w, t in twins.items()},
            "bootstrap_diff_error_pp": noise, "judged_as_check": as_check, **verdict}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


def _agree(r: Mapping[str, Any]) -> str:
    by_error = "tie" if r["agree_error"] is None else ("yes" if r["agree_error"] else "NO")
    return f"{by_error} ({'yes' if r['agree_ce'] else 'no'})"


def _ci(r: Mapping[str, Any]) -> str:
    b = r.get("bootstrap_diff_error_pp")
    return "" if not b else f" [{b['lo']:+.2f}, {b['hi']:+.2f}]"


def report(args: argparse.Namespace, records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    ok = [r for r in records if "failure" not in r]
    summary = summarize(ok, args.target)
    cmd = "python benchmarks/decision.py " + " ".join(a for a in args.argv if a != "--report-only")
    md = [f"# {args.title or 'Held-back check against the retrained twins: ' + args.name}", "",
          "Validation side only: the verdicts and the agreement use the held-back half of the upper split (the "
          "samples the check scored); the test set appears in one context table at the end and decides nothing.", "",
          "```", cmd, "```", "",
          *(["(This report: the same command with `--report-only`, from the finished runs; nothing retrained.)", ""]
            if args.report_only else []),
          "Per seed: the check's figures (balanced cross-entropy of a head solved on the search model's features, "
          "start loss / found loss) and verdict; then the network retrained on the lower split for the search's "
          "epochs with the start loss frozen and with the found loss (as found, before the check ruled) frozen, on "
          "the same held-back samples: balanced cross-entropy and balanced error %. diff = found twin minus start "
          "twin (negative: the found loss is better once retrained). agree: the verdict matches the sign of the "
          "balanced-error difference (in brackets: of the balanced-CE difference; tie: the twins make the same "
          "balanced error on these samples). held-back n (classes): samples and classes present "
          "(a class with one upper sample is never held back, so the check cannot judge it). In brackets after diff: "
          "the 5-95% range of a paired bootstrap of the held-back samples, stratified per class (how well these "
          "samples resolve the difference). decisive: |diff| > "
          f"{args.margin:g} points.", "",
          "| seed | held-back n (classes) | check start | check found | verdict | start twin CE | found twin CE | "
          "start twin err % | found twin err % | diff err (pp) [90% bootstrap] | diff CE | agree (CE) | decisive |",
          "|" + "---|" * 13]
    for r in records:
        if "failure" in r:
            md.append(f"| {r['seed']} | failed: {r['failure']} |" + " |" * 11)
            continue
        s, f = r["twins"]["start"]["held_back"], r["twins"]["found"]["held_back"]
        present = sum(1 for c in s["counts"] if c > 0)
        verdict = "kept found" if r["kept"] else "start put back"
        md.append(f"| {r['seed']} | {r['held_back_samples']} ({present}/{len(s['counts'])}) | "
                  f"{_f(r['check_start'])} | {_f(r['check_found'])} | "
                  f"{verdict} | {_f(s['balanced_ce'])} | {_f(f['balanced_ce'])} | "
                  f"{100 * s['balanced_error']:.2f} | {100 * f['balanced_error']:.2f} | "
                  f"{r['diff_error_pp']:+.2f}{_ci(r)} | "
                  f"{r['diff_ce']:+.4f} | {_agree(r)} | "
                  f"{'yes' if r['decisive'] else 'no'} |")
    n = summary["cases"]
    md += ["", "## Agreement", "",
           f"- seeds: {n}; the check kept the found loss on {summary['kept']}; the found twin had the lower held-back "
           f"balanced error on {summary['found_better_error']}.",
           f"- agreement by balanced error: {summary['agree_error']}/{n - summary['ties']} seeds where the twins "
           f"differ ({summary['ties']} ties); by balanced cross-entropy (the check's own objective): "
           f"{summary['agree_ce']}/{n}.",
           f"- decisive seeds (|diff| > {args.margin:g} pp): {summary['decisive']}; agreement on them: "
           f"{summary['agree_decisive']}/{summary['decisive']} (target: at least {args.target:.0%}; "
           f"{'met' if summary['target_met'] else 'not met'} on these seeds alone).",
           "- disagreements, points of held-back balanced error the check's choice loses: "
           + (", ".join(f"{c:.2f}" for c in summary["disagreement_cost_pp"]) or "none") + ".", "",
           "## Checks on the measurement", "",
           "The check replayed on the search's last checkpoint with the held-back samples and both losses "
           "recovered by this script (start figure / found figure, logged vs replayed):", "",
           "| seed | logged start / found | replayed start / found | found - start: logged; replays (fresh "
           "augmentation draws) | clean held-back images: start / found, verdict | found loss from step |",
           "|---|---|---|---|---|---|"]
    for r in ok:
        rp = r["replay"]
        draws = "; ".join(f"{f - st:+.4f}" for st, f in rp.get("draws", [[rp["start"], rp["found"]]]))
        clean = rp.get("clean")
        clean_txt = "-" if not clean else (f"{clean[0]:.4f} / {clean[1]:.4f}, "
                                           f"{'kept found' if clean[1] < clean[0] else 'start put back'}")
        md.append(f"| {r['seed']} | {r['check_start']:.4f} / {r['check_found']:.4f} | {rp['start']:.4f} / "
                  f"{rp['found']:.4f} | {r['check_found'] - r['check_start']:+.4f}; {draws} | {clean_txt} | "
                  f"{r['found_step']} |")
    md += ["", "The same check on the features of the start twin (a network trained with the start loss, not the "
           "found one) instead of the search model's, held-back images as the check reads them (first draw) and "
           "without augmentation; does its verdict match the twins?", "",
           "| seed | start / found (as read) | verdict | start / found (clean) | verdict | twins: found better? |",
           "|---|---|---|---|---|---|"]
    for r in ok:
        o = r.get("check_on_start_twin")
        if not o:
            continue
        c = o["clean"]
        truth = "tie" if r["agree_error"] is None else ("yes" if r["found_better_error"] else "no")
        md.append(f"| {r['seed']} | {o['start']:.4f} / {o['found']:.4f} | "
                  f"{'kept found' if o['found'] < o['start'] else 'start put back'} | {c[0]:.4f} / {c[1]:.4f} | "
                  f"{'kept found' if c[1] < c[0] else 'start put back'} | {truth} |")
    md += ["", "The twins scored on the held-back images as the check reads them (the upper dataset, augmented "
           "where the datamodule augments it: one random draw) instead of without augmentation:", "",
           "| seed | start twin err % | found twin err % | diff err (pp) | diff CE | agree (CE) | decisive |",
           "|---|---|---|---|---|---|---|"]
    for r in ok:
        if "judged_as_check" not in r:
            continue
        j, t = r["judged_as_check"], r["twins"]
        md.append(f"| {r['seed']} | {100 * t['start']['held_back_as_check']['balanced_error']:.2f} | "
                  f"{100 * t['found']['held_back_as_check']['balanced_error']:.2f} | {j['diff_error_pp']:+.2f} | "
                  f"{j['diff_ce']:+.4f} | {_agree(j)} | {'yes' if j['decisive'] else 'no'} |")
    md += ["", "Twins on the rest of the upper split (the part the search drew from) and on the test set, balanced "
           "error % (start twin / found twin), and their training time:", "",
           "| seed | upper rest | test | twin fit s (start / found) |", "|---|---|---|---|"]
    for r in ok:
        t = r["twins"]
        md.append(f"| {r['seed']} | {100 * t['start']['upper_rest']['balanced_error']:.2f} / "
                  f"{100 * t['found']['upper_rest']['balanced_error']:.2f} | "
                  f"{100 * t['start']['test']['balanced_error']:.2f} / "
                  f"{100 * t['found']['test']['balanced_error']:.2f} "
                  f"| {t['start']['fit_time_s']:.0f} / {t['found']['fit_time_s']:.0f} |")
    md += ["", "The search of each seed (reused when finished):", ""]
    md += [f"- seed {r['seed']}: `{r['command']}`" for r in ok]
    md.append("")
    data = {"command": cmd, "config": str(args.config), "set": list(args.set), "margin_pp": args.margin,
            "summary": summary, "seeds": records}
    return "\n".join(md), data


def combine(paths: Sequence[Path], margin: float = MARGIN, target: float = 0.9,
            fit_tolerance: float = FIT_TOLERANCE) -> tuple[list[str], dict[str, Any]]:
    """The agreement over every finished benchmark-seed case of several reports' JSON files (judged anew with
    ``margin``), for the heads alone (the check before the fit rule) and with the fit rule (``fit_tolerance``, on the
    training error the replay measured): a table of the cases and the summaries (markdown lines, data)."""
    cases = []
    for path in paths:
        for r in json.loads(Path(path).read_text())["seeds"]:
            if "failure" in r:
                continue
            j = judge(r["check_start"], r["check_found"], r["twins"]["start"]["held_back"],
                      r["twins"]["found"]["held_back"], margin)
            fit = r.get("replay", {}).get("training_error")
            fits = fit is not None and fit <= fit_tolerance
            # the decision of today's check: kept only where the network fits its training data and the heads agree
            rule = judge(r["check_start"], r["check_found"] if fits else math.inf, r["twins"]["start"]["held_back"],
                         r["twins"]["found"]["held_back"], margin)
            cases.append({"report": Path(path).stem, "seed": r["seed"], **j, "training_error": fit,
                          "rule": rule})
    summary = summarize(cases, target)
    rule_summary = summarize([c["rule"] for c in cases if c["training_error"] is not None], target)
    md = ["| report | seed | heads alone | training error % | with the fit rule (fit_tolerance "
          f"{fit_tolerance:g}) | found twin - start twin, held-back balanced error (pp) | agree (heads alone) | "
          "agree (with the rule) | decisive |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        fit = "-" if c["training_error"] is None else f"{100 * c['training_error']:.1f}"
        md.append(f"| {c['report']} | {c['seed']} | {'kept found' if c['kept'] else 'start put back'} | {fit} | "
                  f"{'kept found' if c['rule']['kept'] else 'start put back'} | {c['diff_error_pp']:+.2f} | "
                  f"{_agree(c)} | {_agree(c['rule'])} | {'yes' if c['decisive'] else 'no'} |")
    md += ["", f"- cases: {summary['cases']}; agreement by balanced error: {summary['agree_error']}/"
           f"{summary['cases'] - summary['ties']} where the twins differ ({summary['ties']} ties); by balanced "
           f"cross-entropy: {summary['agree_ce']}/{summary['cases']}.",
           f"- decisive cases (|diff| > {margin:g} pp): {summary['decisive']}; agreement on them: "
           f"{summary['agree_decisive']}/{summary['decisive']} (target: at least {target:.0%}, "
           f"{'met' if summary['target_met'] else 'not met'}).",
           "- disagreements, points of held-back balanced error the check's choice loses: "
           + (", ".join(f"{c:.2f}" for c in summary["disagreement_cost_pp"]) or "none") + ".",
           f"- **with the fit rule** (the found loss kept only where the training error is at most "
           f"{fit_tolerance:g}; {rule_summary['cases']} cases with a measured training error): kept "
           f"{rule_summary['kept']}; agreement by balanced error {rule_summary['agree_error']}/"
           f"{rule_summary['cases'] - rule_summary['ties']} where the twins differ; decisive cases: "
           f"{rule_summary['agree_decisive']}/{rule_summary['decisive']} agree (target: at least {target:.0%} of at "
           f"least 10 cases; {'met' if rule_summary['target_met'] and rule_summary['decisive'] >= 10 else 'not met'})"
           ". Disagreements cost: " + (", ".join(f"{c:.2f}" for c in rule_summary["disagreement_cost_pp"]) or "none")
           + "."]
    return md, {"cases": cases, "summary": summary, "with_fit_rule": rule_summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a lightning-autobalance pipeline YAML")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: the agreement over the cases of these reports' JSON files, written to "
                             "<docs-dir>/<docs-name or decision_combined>.md/.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--name", help="runs folder and docs name (default: the config's stem, as quality.py)")
    parser.add_argument("--title", help="title of the markdown")
    parser.add_argument("--runs-dir", default="runs/quality", help="quality.py's runs folder (its searches are reused)")
    parser.add_argument("--docs-dir", default="docs/results")
    parser.add_argument("--docs-name", help="name of the docs files (default: decision_<name>)")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help="decisive above this many points of balanced error")
    parser.add_argument("--target", type=float, default=0.9, help="share of decisive seeds that must agree")
    parser.add_argument("--threads", type=int, default=None, help="torch / OMP threads (here and in the pipeline)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the report from the finished seeds' files (verdicts judged anew)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="ARG",
                        help="extra lightning-autobalance arguments, as in quality.py (--set=--config=<file> too)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    docs = ROOT / args.docs_dir if not Path(args.docs_dir).is_absolute() else Path(args.docs_dir)
    if args.combine:
        lines, data = combine(args.combine, args.margin, args.target)
        cmd = "python benchmarks/decision.py " + " ".join(args.argv)
        stem = args.docs_name or "decision_combined"
        docs.mkdir(parents=True, exist_ok=True)
        title = args.title or "Held-back check against the retrained twins: every case"
        (docs / f"{stem}.md").write_text("\n".join([f"# {title}", "", "```", cmd, "```", "", *lines, ""]))
        (docs / f"{stem}.json").write_text(json.dumps({"command": cmd, **data}, indent=2))
        print(f"wrote {docs / (stem + '.md')}", flush=True)
        return
    if args.config is None:
        parser.error("--config is required (unless --combine)")
    args.name = args.name or args.config.stem
    package = Path(AutoBalanceCallback.__module__ and sys.modules[AutoBalanceCallback.__module__].__file__).resolve()
    if ROOT not in package.parents:
        print(f"warning: the package is imported from {package}, not from this checkout ({ROOT})", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        torch.set_num_threads(args.threads)
    runs = (ROOT / args.runs_dir if not Path(args.runs_dir).is_absolute() else Path(args.runs_dir)) / args.name
    docs.mkdir(parents=True, exist_ok=True)
    stem = args.docs_name or f"decision_{args.name}"
    records = []
    for s in args.seeds:
        t0 = time.perf_counter()
        try:
            if args.report_only:
                command = quality._show(quality.pipeline_args(args.config, s, runs / f"seed_{s}",
                                                              [quality.AUTOBALANCE], list(args.set)))
                if (runs / f"seed_{s}" / "decision" / "replay.json").is_file():
                    with_training_error(args.config, s, runs / f"seed_{s}", list(args.set))
                records.append(collect_one(runs / f"seed_{s}", s, args.margin, command))
            else:
                records.append(run_one(args.config, s, runs / f"seed_{s}", list(args.set), env, args.margin))
        except Exception as exc:  # a failing seed is recorded and the others go on
            import traceback

            traceback.print_exc()
            records.append({"seed": s, "failure": f"{type(exc).__name__}: {exc}"})
        print(f"[seed {s}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        md, data = report(args, records)  # written after every seed: a partial table survives an interruption
        (docs / f"{stem}.md").write_text(md)
        (docs / f"{stem}.json").write_text(json.dumps(data, indent=2))
    print(f"wrote {docs / (stem + '.md')}", flush=True)


if __name__ == "__main__":
    main()
