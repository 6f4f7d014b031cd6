"""Quality against the baselines, over several seeds, from one ``lightning-autobalance`` config.

For every seed ``s`` it runs the pipeline of the config (``lightning-autobalance pipeline``) with
``--seed_everything s --data.init_args.seed s`` into its own folder ``<runs-dir>/<name>/seed_<s>``: AutoBalance
(search on the 80/20 per-class split, then retraining on the whole training set with the found loss) and every
class-imbalance baseline (``--methods`` picks others, e.g. the group baselines), all with the config's settings.
AutoBalance uses whatever the config says, which for the shipped configs is the library's defaults
(``AutoBalanceCallback()`` with no arguments, LA start, offsets searched: the shared tau and per-class
residuals of the hierarchical parametrisation).

* Finished stages are reused on rerun (the pipeline skips a stage whose ``result.json`` exists).
* One process per seed runs all methods; when it fails, each unfinished method is rerun alone, and a method that
  still fails is recorded as a failure (``<stage>/failure.json`` with the end of its log) and the benchmark goes on.
* ``--grid``: a search-budget comparison. For each seed, every point of a grid over logit adjustment's ``tau`` and
  VS's ``(gamma, tau)`` is trained on the same search split (lower part) that AutoBalance's search uses, for the
  same number of epochs, and scored by balanced error on the held-out upper part (ties broken by balanced
  cross-entropy there; ``--grid-select worst_class``: by its worst class's error there); the chosen point is
  retrained on the whole training set with the pipeline and tested. The training compute (epochs, images seen) of
  the grid is reported beside AutoBalance's. ``--vs-gammas`` with no value leaves VS out of the grid.

* ``--search-model``: also tests the model the two-phase search ended with (its last checkpoint, trained on the lower
  split only) on the test set and on the upper split, and reports it class by class beside the retrained model:
  whether a failure of the found loss is already in the search or appears only when the loss is retrained. It also
  trains the search's start (the same model, split and epochs, the starting loss held fixed, one more training on
  the lower split) and scores it on the upper split: whether the search lowered its own held-out objective, a
  validation-only check.

Writes ``<docs-dir>/<name>.md`` (the command at the top, tables of mean and standard error over seeds, every seed's
figures at the end), ``<docs-dir>/<name>.json`` (every finished row per seed, with its per-class errors: what
``benchmarks/evidence.py`` needs to pair methods by seed once the runs folder is gone) and PNG plots
(``<name>_balanced_error.png``, ``<name>_per_class.png``). Timings are wall-clock on whatever machine runs it.

Example::

    python benchmarks/quality.py --config examples/digits_lt.yaml --seeds 0 1 2 3 4 --grid
    python benchmarks/quality.py --config benchmarks/configs/cifar10_lt_jpeg_short.yaml --seeds 0 \\
        --methods autobalance ce la vs
    python benchmarks/quality.py --config examples/digits_lt.yaml --seeds 0 1 2 3 4 --report-only
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lightning_autobalance.runner.pipeline import BASELINES

ROOT = Path(__file__).resolve().parent.parent
AUTOBALANCE = "autobalance"
#: One fit that learns the loss until the fold-in, then trains on everything with it (the pipeline's --one_phase).
ONE_PHASE = "one_phase"
#: The model the two-phase search ended with, tested (``--search-model``): a report row, not a method to run.
SEARCH_MODEL = "search_model"
METHODS = [AUTOBALANCE, ONE_PHASE, *BASELINES]
_OURS = (AUTOBALANCE, ONE_PHASE)
#: The default: AutoBalance and the class-imbalance baselines (the group baselines need group labels).
DEFAULT_METHODS = [AUTOBALANCE, "ce", "la", "cdt", "vs", "class_balanced", "inverse_frequency", "ldam_drw", "focal"]
LABELS = {
    AUTOBALANCE: "AutoBalance (search + retrain)",
    ONE_PHASE: "AutoBalance one-phase (one run)",
    "ce": "cross-entropy",
    "la": "logit adjustment",
    "cdt": "CDT",
    "vs": "VS",
    "class_balanced": "class-balanced",
    "inverse_frequency": "inverse frequency",
    "ldam_drw": "LDAM-DRW",
    "focal": "focal",
    "la_uniform": "LA + uniform augmentation (start strengths)",
    "la_cuda": "LA + CUDA (per-class augmentation curriculum)",
    SEARCH_MODEL: "AutoBalance search model (lower split, not retrained)",
}
GRID_LABELS = {
    "grid_la": "grid: LA tau ({n} points)",
    "grid_vs": "grid: VS gamma x tau ({n} points)",
    "grid_all": "grid: LA + VS ({n} points)",
}


# ----------------------------------------------------------------------------------------------------------------
# Commands and processes
# ----------------------------------------------------------------------------------------------------------------


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "lightning-autobalance"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lightning-autobalance")
    return [found] if found else [sys.executable, "-m", "lightning_autobalance.runner.cli"]


def _flow(values: Sequence[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _rel(path: Path) -> str:
    """``path`` relative to the repository root (where every command runs) when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def pipeline_args(config: Path, seed: int, out: Path, methods: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Arguments of ``lightning-autobalance`` for one seed (after the executable), run from the repository root."""
    baselines = [m for m in methods if m not in _OURS]
    one_phase = ["--one_phase", "true"] if ONE_PHASE in methods else []
    return ["pipeline", "--config", _rel(config), "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
            "--output_dir", _rel(out), "--search", "true" if AUTOBALANCE in methods else "false", *one_phase,
            "--baselines", _flow(baselines), "--trainer.enable_progress_bar", "false", *extra]


def _show(args: Sequence[str]) -> str:
    return shlex.join(["lightning-autobalance", *args])


def _run_logged(args: list[str], log: Path, env: dict[str, str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {_show(args)}\n")
        fh.flush()
        proc = subprocess.run([*_cli(), *args], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc.returncode


def _tail(log: Path, n: int = 25) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _stage(method: str) -> str:
    return "autobalance" if method == AUTOBALANCE else method


def _done(out: Path, method: str) -> bool:
    stages = ["search", "autobalance"] if method == AUTOBALANCE else [method]
    return all((out / s / "result.json").is_file() for s in stages)


def run_seed(config: Path, seed: int, out: Path, methods: Sequence[str], extra: Sequence[str],
             env: dict[str, str]) -> dict[str, str]:
    """Runs the pipeline of one seed; returns the commands that were (or would have been) run, per method."""
    commands = {"all": _show(pipeline_args(config, seed, out, methods, extra))}
    for m in methods:
        commands[m] = _show(pipeline_args(config, seed, out, [m], extra))
    todo = [m for m in methods if not _done(out, m)]
    if not todo:
        print(f"[seed {seed}] every method already done in {out}", flush=True)
        return commands
    for m in todo:  # a rerun retries earlier failures
        (out / _stage(m) / "failure.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    print(f"[seed {seed}] running {todo} -> {out}", flush=True)
    rc = _run_logged(pipeline_args(config, seed, out, todo, extra), out / "pipeline.log", env)
    print(f"[seed {seed}] pipeline exited {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    if rc == 0 and all(_done(out, m) for m in todo):
        return commands
    for m in [m for m in todo if not _done(out, m)]:
        log = out / f"{_stage(m)}.log"
        t0 = time.perf_counter()
        rc_m = _run_logged(pipeline_args(config, seed, out, [m], extra), log, env)
        if rc_m != 0 or not _done(out, m):
            tail = _tail(log)
            last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), f"exit code {rc_m}")
            fail = {"method": m, "seed": seed, "returncode": rc_m, "error": last.strip(), "log": str(log),
                    "log_tail": tail, "command": commands[m]}
            (out / _stage(m)).mkdir(parents=True, exist_ok=True)
            (out / _stage(m) / "failure.json").write_text(json.dumps(fail, indent=2))
            print(f"[seed {seed}] {m} FAILED ({last.strip()[:200]}); see {log}", flush=True)
        else:
            print(f"[seed {seed}] {m} done alone in {time.perf_counter() - t0:.0f} s", flush=True)
    return commands


# ----------------------------------------------------------------------------------------------------------------
# Grid search over LA's tau and VS's (gamma, tau), selected on the upper split
# ----------------------------------------------------------------------------------------------------------------


def grid_points(la_taus: Sequence[float], vs_gammas: Sequence[float], vs_taus: Sequence[float]
                ) -> list[tuple[str, str, dict[str, float]]]:
    points = [(f"la_tau{t:g}", "la", {"tau": float(t)}) for t in la_taus]
    points += [(f"vs_g{g:g}_tau{t:g}", "vs", {"gamma": float(g), "tau": float(t)}) for g in vs_gammas for t in vs_taus]
    return points


@functools.lru_cache(maxsize=1)
def _templates(config: Path, seed: int, extra: tuple[str, ...]) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """The model and datamodule templates, trainer arguments and pipeline arguments of the config, as the CLI
    builds them (nothing is run)."""
    from lightning_autobalance.runner.cli import AutoBalanceCLI

    class _Parse(AutoBalanceCLI):
        def _run_subcommand(self, subcommand: str) -> None:  # build everything, run nothing
            return None

    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's relative paths are relative to the root, as in the pipeline commands
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it is given args besides sys.argv
    try:
        cli = _Parse(args=pipeline_args(config, seed, Path(os.devnull), ["ce"], extra))
    finally:
        os.chdir(cwd)
        sys.argv = argv
    return cli.model, cli.datamodule, dict(cli.trainer.init_kwargs), dict(cli.config["pipeline"])


def _evaluate(model: Any, loader: Any, num_classes: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    model.eval()
    errors, losses, counts = (torch.zeros(num_classes, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0], batch[1]
            logits = model(x).double()
            wrong = (logits.argmax(-1) != y).double()
            ce = F.cross_entropy(logits, y, reduction="none")
            errors.index_add_(0, y, wrong)
            losses.index_add_(0, y, ce)
            counts.index_add_(0, y, torch.ones_like(wrong))
    present = counts > 0
    per_class = (errors[present] / counts[present])
    return {"balanced_error": float(per_class.mean()), "balanced_ce": float((losses[present] / counts[present]).mean()),
            "worst_class_error": float(per_class.max()), "per_class_error": (errors / counts.clamp_min(1)).tolist(),
            "per_class_ce": (losses / counts.clamp_min(1)).tolist(), "counts": counts.long().tolist()}


def plain_trainer(trainer_kwargs: dict[str, Any], epochs: int, out: Path) -> Any:
    """A Trainer of the config's settings for one quiet fit: no callbacks, logger, checkpoints or validation."""
    import pytorch_lightning as pl

    keep = {k: v for k, v in trainer_kwargs.items()
            if k not in ("callbacks", "logger", "enable_checkpointing", "default_root_dir", "max_epochs",
                         "limit_val_batches", "num_sanity_val_steps", "enable_progress_bar", "enable_model_summary")}
    return pl.Trainer(**keep, max_epochs=epochs, logger=False, enable_checkpointing=False, callbacks=[],
                      limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(out))


def run_grid_point(config: Path, seed: int, out: Path, name: str, preset: str, kwargs: dict[str, float],
                   extra: Sequence[str], augment: bool = False) -> dict[str, Any]:
    """Trains one grid point on the search split (as the AutoBalance search does, with no callback) and scores it
    on the upper split. ``augment``: the model's searched augmentation is applied at its start strengths, frozen (the
    fixed-start twin of a search of the loss and the augmentation)."""
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    import pytorch_lightning as pl

    from lightning_autobalance.runner.pipeline import _clone

    model_t, dm_t, trainer_kwargs, pipe = _templates(config, seed, tuple(extra))
    epochs = pipe.get("search_epochs") or trainer_kwargs.get("max_epochs")
    pl.seed_everything(seed, workers=True, verbose=False)  # as every pipeline stage does
    split = _clone(dm_t, search_split=True, val_source="upper")
    model = _clone(model_t, class_counts=split.class_counts, num_classes=split.num_classes, loss="autobalance",
                   preset=preset, preset_kwargs=dict(kwargs), search=("augment",) if augment else (), loss_file=None,
                   freeze_loss=augment)
    trainer = plain_trainer(trainer_kwargs, epochs, out)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=split)
    fit_time = time.perf_counter() - t0
    score = _evaluate(model, split.val_dataloader(), split.num_classes)
    result = {"point": name, "preset": preset, "preset_kwargs": dict(kwargs), "epochs": epochs,
              "train_images": int(sum(split.class_counts)), "fit_time_s": fit_time,
              **{f"upper_{k}": v for k, v in score.items()}}
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


#: How a grid point is chosen on the upper split (``--grid-select``): the criterion, then the tie-breaks.
SELECT = {
    "balanced_error": lambda r: (round(r["upper_balanced_error"], 9), r["upper_balanced_ce"]),
    "worst_class": lambda r: (round(_upper_worst(r), 9), round(r["upper_balanced_error"], 9), r["upper_balanced_ce"]),
}


def _present(values: Sequence[float], counts: Sequence[int]) -> list[float]:
    """The per-class ``values`` of the classes that have images (``counts > 0``)."""
    return [v for v, n in zip(values, counts) if n > 0]


def _upper_worst(result: dict[str, Any]) -> float:
    """The worst per-class error on the upper split, over the classes it has images of."""
    counts = result.get("upper_counts", result.get("upper_upper_counts"))  # the second: results written before
    return max(_present(result["upper_per_class_error"], counts))


def _choose(results: list[dict[str, Any]], select: str = "balanced_error") -> dict[str, Any]:
    return min(results, key=SELECT[select])


def run_grid(config: Path, seed: int, out: Path, points: list[tuple[str, str, dict[str, float]]],
             extra: Sequence[str], env: dict[str, str], select: str = "balanced_error") -> dict[str, Any]:
    """The grid of one seed: every point on the search split, then the LA and VS points chosen by ``select``
    (a key of :data:`SELECT`) retrained."""
    results = []
    for name, preset, kw in points:
        point_dir = out / "grid" / name
        try:
            results.append(run_grid_point(config, seed, point_dir, name, preset, kw, extra))
        except Exception as exc:  # a failing point is recorded and the grid goes on
            point_dir.mkdir(parents=True, exist_ok=True)
            (point_dir / "failure.json").write_text(json.dumps(
                {"point": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()},
                indent=2))
            print(f"[seed {seed}] grid point {name} FAILED: {exc}", flush=True)
    chosen: dict[str, Any] = {}
    for family in ("la", "vs"):
        fam = [r for r in results if r["preset"] == family]
        if not fam:
            continue
        best = _choose(fam, select)
        retrain_dir = out / "grid_retrain" / best["point"]
        kw = ", ".join(f"{k}: {v:g}" for k, v in best["preset_kwargs"].items())
        args = pipeline_args(config, seed, retrain_dir, [family], [*extra, "--model.preset_kwargs", "{" + kw + "}"])
        if not (retrain_dir / family / "result.json").is_file():
            rc = _run_logged(args, retrain_dir / "pipeline.log", env)
            if rc != 0:
                print(f"[seed {seed}] retraining {best['point']} FAILED (exit {rc}); see {retrain_dir}", flush=True)
        chosen[family] = {"point": best["point"], "command": _show(args),
                          "result": _rel(retrain_dir / family / "result.json")}
    if "la" in chosen and "vs" in chosen:
        best = _choose([r for r in results if r["point"] in (chosen["la"]["point"], chosen["vs"]["point"])], select)
        chosen["all"] = chosen["la" if best["preset"] == "la" else "vs"]
    summary = {"seed": seed, "select": select, "points": results, "chosen": chosen}
    (out / "grid" / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The search model, tested (--search-model)
# ----------------------------------------------------------------------------------------------------------------


def evaluate_search_model(config: Path, seed: int, out: Path, extra: Sequence[str]) -> dict[str, Any] | None:
    """Tests the model the search ended with (the search stage's ``last.ckpt``: trained on the lower split under
    the loss being learned) on the test set and on the upper split, in evaluation mode, as the pipeline tests a
    stage; and trains its reference, the same model on the same split for the same epochs with the starting loss
    held fixed (a searched augmentation at its start strengths; no hyper step), scored on the upper split: whether
    the search improved its own held-out objective.
    Written to ``<seed>/search/search_model.json``; ``None`` when the search has no checkpoint."""
    done = out / "search" / "search_model.json"
    if done.is_file():
        return json.loads(done.read_text())
    ckpt = out / "search" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    import torch

    from lightning_autobalance.runner.pipeline import _clone, _counts

    model_t, dm_t, _, _ = _templates(config, seed, tuple(extra))
    hp = dict(model_t.hparams)
    start = run_grid_point(config, seed, out / "search" / "start_reference", "start", hp.get("preset", "la"),
                           dict(hp.get("preset_kwargs") or {}), extra, augment="augment" in (hp.get("search") or ()))
    split = _clone(dm_t, search_split=True, val_source="upper")
    split.setup("fit")
    model = _clone(model_t, **_counts(model_t, split), loss="autobalance")
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    full = _clone(dm_t, search_split=False)
    full.setup("test")
    result = {"checkpoint": _rel(ckpt), "test": _evaluate(model, full.test_dataloader(), full.num_classes),
              "upper": _evaluate(model, split.val_dataloader(), split.num_classes),
              "start_upper": {k[len("upper_"):]: v for k, v in start.items() if k.startswith("upper_")}}
    done.write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Aggregation, table, plots
# ----------------------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(runs: Path, seeds: Sequence[int], methods: Sequence[str], search_model: bool = False
            ) -> tuple[dict[str, dict[int, Any]], dict[int, list[int]]]:
    """``rows[method][seed]`` = the stage result (with ``time_s``), or ``{"failure": ...}``; class counts per seed.
    With ``search_model``, also ``rows["search_model"]``: the search's last model, tested (and its upper-split
    scores under ``"upper"``)."""
    rows: dict[str, dict[int, Any]] = {m: {} for m in methods}
    counts: dict[int, list[int]] = {}
    for s in seeds:
        out = runs / f"seed_{s}"
        summary = _load(out / "results.json")
        if summary and "class_counts" in summary:
            counts[s] = summary["class_counts"]
        for m in methods:
            stage = out / _stage(m)
            res = _load(stage / "result.json")
            if m == AUTOBALANCE and res is not None:
                search = _load(out / "search" / "result.json")
                if search is None:
                    res = None
                else:
                    res = {**res, "search_time_s": search["fit_time_s"], "hyper_steps": search.get("hyper_steps"),
                           "skipped_steps": search.get("skipped_steps")}
            if res is not None and "balanced_error" in res:
                res["time_s"] = res.get("fit_time_s", 0.0) + res.get("search_time_s", 0.0)
                rows[m][s] = res
            elif (stage / "failure.json").is_file():
                rows[m][s] = {"failure": _load(stage / "failure.json")}
        tested = _load(out / "search" / "search_model.json") if search_model else None
        if tested:
            search = _load(out / "search" / "result.json") or {}
            rows.setdefault(SEARCH_MODEL, {})[s] = {**tested["test"], "upper": tested["upper"],
                                                    "start_upper": tested.get("start_upper"),
                                                    "time_s": search.get("fit_time_s", 0.0)}
    return rows, counts


def collect_grid(runs: Path, seeds: Sequence[int]) -> tuple[dict[str, dict[int, Any]], dict[int, Any]]:
    rows: dict[str, dict[int, Any]] = {"grid_la": {}, "grid_vs": {}, "grid_all": {}}
    summaries: dict[int, Any] = {}
    for s in seeds:
        summary = _load(runs / f"seed_{s}" / "grid" / "summary.json")
        if not summary:
            continue
        summaries[s] = summary
        points = {p["point"]: p for p in summary["points"]}
        for family, key in (("la", "grid_la"), ("vs", "grid_vs"), ("all", "grid_all")):
            ch = summary["chosen"].get(family)
            # found from the runs folder, so that a copied or moved runs folder still reads back
            res = (_load(runs / f"seed_{s}" / "grid_retrain" / ch["point"] / points[ch["point"]]["preset"]
                         / "result.json") if ch else None)
            if res is None or "balanced_error" not in res:
                if ch:
                    rows[key][s] = {"failure": {"error": f"retraining of {ch['point']} did not finish"}}
                continue
            fam_points = [p for p in points.values() if family == "all" or p["preset"] == family]
            res = {**res, "chosen": ch["point"], "points": len(fam_points),
                   "grid_time_s": sum(p["fit_time_s"] for p in fam_points),
                   "grid_epochs": sum(p["epochs"] for p in fam_points),
                   "grid_images": sum(p["epochs"] * p["train_images"] for p in fam_points)}
            res["time_s"] = res["grid_time_s"] + res.get("fit_time_s", 0.0)
            rows[key][s] = res
    return rows, summaries


def _stats(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), se


def _pm(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, se = _stats(values)
    if math.isnan(mean):
        return "-"
    if math.isnan(se):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}"


def _ok(rows: dict[int, Any]) -> dict[int, Any]:
    return {s: r for s, r in rows.items() if "failure" not in r}


def table(rows: dict[str, dict[int, Any]], seeds: Sequence[int], labels: dict[str, str],
          reference: str | None) -> list[str]:
    head = ["method", "n", "balanced error %", "tail error %", "worst-class error %", "head error %",
            "medium error %"]
    if reference:
        head.append(f"minus {labels.get(reference, reference).split(' (')[0]}, paired (pp)")
    head.append("fit wall time s (per seed)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = _ok(rows.get(reference, {})) if reference else {}
    for m, per_seed in rows.items():
        ok = _ok(per_seed)
        failed = [s for s, r in per_seed.items() if "failure" in r]
        n = f"{len(ok)}/{len(seeds)}" + (f" ({len(failed)} failed)" if failed else "")
        cells = [labels.get(m, m), n]
        for key in ("balanced_error", "tail_error", "worst_class_error", "head_error", "medium_error"):
            cells.append(_pm([r[key] for r in ok.values() if r.get(key) is not None and r[key] == r[key]]))
        if reference:
            diffs = [ok[s]["balanced_error"] - ref[s]["balanced_error"] for s in ok if s in ref]
            cell = "-" if m == reference or not diffs else _pm(diffs)
            cells.append(("+" + cell) if cell != "-" and not cell.startswith("-") else cell)
        cells.append(_pm([r["time_s"] for r in ok.values()], scale=1.0, digits=0))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_balanced(rows: dict[str, dict[int, Any]], labels: dict[str, str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in rows if _ok(rows[m])]
    means = [100 * _stats([r["balanced_error"] for r in _ok(rows[m]).values()])[0] for m in names]
    ses = [100 * np.nan_to_num(_stats([r["balanced_error"] for r in _ok(rows[m]).values()])[1]) for m in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2))
    colours = ["tab:red" if m == AUTOBALANCE else "tab:green" if m.startswith("grid") else "tab:blue" for m in names]
    x = np.arange(len(names))
    ax.bar(x, means, yerr=ses, color=colours, alpha=0.75, capsize=4)
    for i, m in enumerate(names):
        vals = [100 * r["balanced_error"] for r in _ok(rows[m]).values()]
        ax.plot(np.full(len(vals), x[i]) + np.linspace(-0.15, 0.15, len(vals)), vals, "k.", ms=4)
    ax.set_xticks(x)
    ax.set_xticklabels([labels.get(m, m) for m in names], rotation=30, ha="right")
    ax.set_ylabel("balanced test error %")
    ax.set_title(f"{title}\n(mean ± SE over seeds; dots: single seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(rows: dict[str, dict[int, Any]], counts: dict[int, list[int]], labels: dict[str, str],
                   path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not counts:
        return
    c = np.mean([counts[s] for s in counts], axis=0)
    order = np.argsort(-c, kind="stable")
    x = np.arange(len(c))
    fig, ax = plt.subplots(figsize=(max(7.5, 0.35 * len(c)), 4.5))
    colours = iter([plt.get_cmap("tab10")(i) for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)] * 3)  # no red: AutoBalance's
    for m, per_seed in rows.items():
        ok = [r["per_class_error"] for r in _ok(per_seed).values() if r.get("per_class_error")]
        if not ok:
            continue
        err = 100 * np.mean(ok, axis=0)
        if m == AUTOBALANCE:  # wide and underneath, so a baseline with the same errors stays visible on top
            style = {"lw": 5.0, "color": "tab:red", "alpha": 0.45, "zorder": 1}
        else:
            style = {"lw": 1.2, "color": next(colours), "zorder": 2}
        ax.plot(x, err[order], "o-", ms=3, label=labels.get(m, m), **style)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{int(k)}\n({c[k]:.0f})" for k in order], fontsize=7)
    ax.set_xlabel("class (training images), most frequent first")
    ax.set_ylabel("test error of the class % (mean over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(rows: dict[str, dict[int, Any]], labels: dict[str, str], grid: dict[str, dict[int, Any]] | None
            ) -> list[str]:
    ab = _ok(rows.get(AUTOBALANCE, {}))
    if not ab:
        return ["AutoBalance has no finished run: no target can be judged."]
    ab_mean, ab_se = _stats([r["balanced_error"] for r in ab.values()])
    baselines = {m: _ok(r) for m, r in rows.items() if m not in (AUTOBALANCE, SEARCH_MODEL) and _ok(r)}
    lines = []
    if baselines:
        best = min(baselines, key=lambda m: _stats([r["balanced_error"] for r in baselines[m].values()])[0])
        b_mean, b_se = _stats([r["balanced_error"] for r in baselines[best].values()])
        common = [s for s in ab if s in baselines[best]]
        d_mean, d_se = _stats([ab[s]["balanced_error"] - baselines[best][s]["balanced_error"] for s in common])
        se = 0.0 if math.isnan(b_se) else b_se
        met = ab_mean <= b_mean + se
        lines.append(f"* Best baseline: **{labels.get(best, best)}**, {100 * b_mean:.2f}"
                     + ("" if math.isnan(b_se) else f" ± {100 * b_se:.2f}") + f" %; AutoBalance {100 * ab_mean:.2f}"
                     + ("" if math.isnan(ab_se) else f" ± {100 * ab_se:.2f}") + " %; paired difference "
                     f"{100 * d_mean:+.2f}" + ("" if math.isnan(d_se) else f" ± {100 * d_se:.2f}")
                     + f" pp over {len(common)} seed(s).")
        lines.append(f"* Target (AutoBalance mean <= best baseline mean + its standard error): "
                     f"**{'met' if met else 'missed'}** ({100 * ab_mean:.2f} vs {100 * (b_mean + se):.2f}).")
        lines.append(f"* Stretch (1 point below the best baseline): "
                     f"**{'met' if ab_mean <= b_mean - 0.01 else 'missed'}** ({100 * ab_mean:.2f} vs "
                     f"{100 * (b_mean - 0.01):.2f}).")
    if grid:
        for key, per_seed in grid.items():
            ok = _ok(per_seed)
            if not ok:
                continue
            g_mean, g_se = _stats([r["balanced_error"] for r in ok.values()])
            common = [s for s in ab if s in ok]
            d_mean, d_se = _stats([ab[s]["balanced_error"] - ok[s]["balanced_error"] for s in common])
            se = 0.0 if math.isnan(g_se) else g_se
            lines.append(f"* Against {labels.get(key, key)}: {100 * g_mean:.2f}"
                         + ("" if math.isnan(g_se) else f" ± {100 * g_se:.2f}") + " %; paired difference "
                         f"{100 * d_mean:+.2f}" + ("" if math.isnan(d_se) else f" ± {100 * d_se:.2f}")
                         + f" pp: target (at or below, within its SE) **"
                         f"{'met' if ab_mean <= g_mean + se else 'missed'}**.")
    return lines


def write_report(args: argparse.Namespace, runs: Path, commands: dict[int, dict[str, str]], extra: list[str]
                 ) -> Path:
    seeds, methods = args.seeds, args.methods
    rows, counts = collect(runs, seeds, methods, args.search_model)
    docs = ROOT / args.docs_dir if not Path(args.docs_dir).is_absolute() else Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    name = args.name
    labels = dict(LABELS)
    grid_rows: dict[str, dict[int, Any]] = {}
    grid_summaries: dict[int, Any] = {}
    if args.grid:
        grid_rows, grid_summaries = collect_grid(runs, seeds)
        n = {"grid_la": len(args.la_taus), "grid_vs": len(args.vs_gammas) * len(args.vs_taus)}
        n["grid_all"] = n["grid_la"] + n["grid_vs"]
        if not n["grid_la"] or not n["grid_vs"]:  # a one-family grid: no rows for the missing family or the union
            grid_rows = {k: v for k, v in grid_rows.items() if k != "grid_all" and n[k]}
        labels.update({k: v.format(n=n[k]) for k, v in GRID_LABELS.items()})
    title = args.title or name
    # --report-only rewrites the report of runs made by the same command without it
    cmd = shlex.join(["python", "benchmarks/quality.py", *(a for a in args.argv if a != "--report-only")])
    md = [f"# Quality: {title}", "", "Command (from the repository root):", "", "```", cmd, "```", "",
          f"Config: `{args.config}`; seeds {', '.join(map(str, seeds))}; runs in `{_rel(runs)}`. One seed's pipeline "
          f"(seed {seeds[0]}):", "", "```", commands.get(seeds[0], {}).get("all", ""), "```", ""]
    if extra:
        md += [f"Overrides added by the benchmark to every pipeline command: `{shlex.join(extra)}`.", ""]
    md += ["Balanced test error = mean of the per-class test errors (balanced test set); tail / head / medium: "
           "classes by training count (`head_medium_tail`); mean ± standard error over the seeds that finished. "
           "Minus AutoBalance, paired: the method's balanced error minus AutoBalance's on the same seed (same data, "
           "same initial weights), mean ± SE over seeds (positive: AutoBalance is better). Wall time: training "
           "(fit) seconds per seed, AutoBalance = search + retraining; measured on a shared machine, so indicative "
           "only.", ""]
    md += table(rows, seeds, labels, AUTOBALANCE if AUTOBALANCE in methods else None)
    md.append("")
    fails = [(m, s, r["failure"]) for m, per in {**rows, **grid_rows}.items() for s, r in per.items()
             if "failure" in r]
    if fails:
        md += ["**Failures** (recorded, the benchmark went on):", ""]
        md += [f"* {labels.get(m, m)}, seed {s}: `{(f or {}).get('error', '?')[:300]}`"
               + (f" (log: `{f['log']}`)" if f and f.get("log") else "") for m, s, f in fails]
        md.append("")
    ab = _ok(rows.get(AUTOBALANCE, {}))
    if ab:
        hs = [r.get("hyper_steps") for r in ab.values() if r.get("hyper_steps") is not None]
        md += [f"AutoBalance hyper steps per search: {', '.join(map(str, hs))} (seeds {', '.join(map(str, ab))}).",
               ""]
    bal_png, pc_png = f"{name}_balanced_error.png", f"{name}_per_class.png"
    plot_balanced({**rows, **grid_rows}, labels, docs / bal_png, f"{title}\nbalanced test error")
    plot_per_class(rows, counts, labels, docs / pc_png, f"{title}\nper-class test error vs class frequency")
    md += [f"![balanced error per method]({bal_png})", "", f"![per-class error vs class frequency]({pc_png})", ""]
    if counts:
        md += [f"Training class counts (seed {next(iter(counts))}): {next(iter(counts.values()))}.", ""]
    if args.grid:
        md += grid_section(args, rows, grid_rows, grid_summaries, labels)
    if _ok(rows.get(SEARCH_MODEL, {})):
        md += search_model_section(rows, counts)
    md += ["## Targets", "", *targets(rows, labels, grid_rows if args.grid else None), ""]
    every = {**rows, **grid_rows}
    md += per_seed_section(every, labels, f"{name}.json")
    path = docs / f"{name}.md"
    path.write_text("\n".join(md))
    (docs / f"{name}.json").write_text(json.dumps(per_seed_record(every, cmd, counts), indent=1) + "\n")
    print(f"wrote {path} and {name}.json", flush=True)
    return path


#: What the report's JSON keeps of each row: enough to pair methods by seed again without the runs folder.
KEPT = ("balanced_error", "worst_class_error", "head_error", "medium_error", "tail_error", "per_class_error",
        "fit_time_s", "search_time_s", "hyper_steps", "chosen")


def per_seed_record(rows: dict[str, dict[int, Any]], command: str, counts: dict[int, list[int]]) -> dict[str, Any]:
    """``{"command", "class_counts", "seeds": {seed: {method: row}}}``: the finished rows, per seed, with the
    fields of :data:`KEPT` (``benchmarks/evidence.py`` reads this file as it reads a runs folder)."""
    seeds: dict[str, dict[str, Any]] = {}
    for m, per_seed in rows.items():
        for s, r in sorted(_ok(per_seed).items()):
            row = {k: r[k] for k in KEPT if r.get(k) is not None}
            for part in ("upper", "start_upper"):
                if r.get(part):
                    row[part] = {k: r[part][k] for k in ("balanced_error", "per_class_error", "per_class_ce",
                                                         "counts")}
            seeds.setdefault(str(s), {})[m] = {"method": m, **row}
    return {"command": command, "class_counts": {str(s): c for s, c in counts.items()}, "seeds": seeds}


def per_seed_section(rows: dict[str, dict[int, Any]], labels: dict[str, str], json_name: str) -> list[str]:
    """Every finished row's balanced and worst-class error, seed by seed (the per-class errors are in the JSON)."""
    seeds = sorted({s for per_seed in rows.values() for s in _ok(per_seed)})
    if not seeds:
        return []
    md = ["## Per seed", "", f"Test error %, seed by seed (balanced / worst class); every class's error, seed by seed, "
          f"is in [`{json_name}`]({json_name}), which `benchmarks/evidence.py` reads in place of the runs folder.", "",
          "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for m, per_seed in rows.items():
        ok = _ok(per_seed)
        if ok:
            md.append(f"| {labels.get(m, m)} | " + " | ".join(
                f"{100 * ok[s]['balanced_error']:.2f} / {100 * ok[s]['worst_class_error']:.2f}" if s in ok else "-"
                for s in seeds) + " |")
    return [*md, ""]


def search_model_section(rows: dict[str, dict[int, Any]], counts: dict[int, list[int]]) -> list[str]:
    """Class by class: the search's last model on its upper split and on the test set, beside the retrained
    AutoBalance model and logit adjustment (means over seeds)."""
    tested = _ok(rows[SEARCH_MODEL])
    seeds = sorted(tested)
    with_start = all(tested[s].get("start_upper") for s in seeds)
    cols = [("search model: upper CE", lambda s: tested[s]["upper"]["per_class_ce"], 1.0, 2),
            ("search model: upper error %", lambda s: tested[s]["upper"]["per_class_error"], 100.0, 1)]
    if with_start:
        cols += [("start (no search): upper CE", lambda s: tested[s]["start_upper"]["per_class_ce"], 1.0, 2),
                 ("start (no search): upper error %", lambda s: tested[s]["start_upper"]["per_class_error"], 100.0,
                  1)]
    cols.append(("search model: test error %", lambda s: tested[s]["per_class_error"], 100.0, 1))
    for m, label in ((AUTOBALANCE, "retrained: test error %"), ("la", "LA: test error %")):
        ok = _ok(rows.get(m, {}))
        if all(s in ok for s in seeds):
            cols.append((label, functools.partial(lambda o, s: o[s]["per_class_error"], ok), 100.0, 1))
    md = ["## The search model, tested", "",
          f"The model the search ended with (trained on the lower split under the loss as it was being learned; its "
          f"last checkpoint, in evaluation mode), class by class, mean over seeds {', '.join(map(str, seeds))}: its "
          "cross-entropy and error on the upper split (what the upper objective saw), the same for its start (the "
          "same model trained on the same split for the same epochs with the starting loss held fixed), and its "
          "test error beside the retrained model's and LA's.", "",
          "| class | training images | upper images | " + " | ".join(c[0] for c in cols) + " |",
          "|" + "---|" * (len(cols) + 3)]
    ref = seeds[0]
    for k in range(len(tested[ref]["per_class_error"])):
        cells = [str(k), f"{np.mean([counts[s][k] for s in seeds if s in counts]):.0f}" if counts else "-",
                 f"{np.mean([tested[s]['upper']['counts'][k] for s in seeds]):.0f}"]
        cells += [f"{scale * np.mean([get(s)[k] for s in seeds]):.{digits}f}" for _, get, scale, digits in cols]
        md.append("| " + " | ".join(cells) + " |")
    if with_start:
        md += ["", "On the upper split, seed by seed: the search model against its start (the same model, split and "
               "epochs with the starting loss held fixed). A search that pays lowers its own held-out objective.", "",
               "| seed | | balanced CE | largest class CE | balanced error % | worst-class error % |",
               "|---|---|---|---|---|---|"]
        for s in seeds:
            for label, u in (("start (no search)", tested[s]["start_upper"]), ("search model", tested[s]["upper"])):
                md.append(f"| {s} | {label} | {_upper_summary(u)} |")
    return [*md, ""]


def _upper_summary(upper: dict[str, Any]) -> str:
    """Balanced CE, largest class CE, balanced and worst-class error over the classes the upper split holds."""
    ce, err = (_present(upper[k], upper["counts"]) for k in ("per_class_ce", "per_class_error"))
    return f"{np.mean(ce):.3f} | {max(ce):.3f} | {100 * np.mean(err):.2f} | {100 * max(err):.2f}"


def grid_section(args: argparse.Namespace, rows: dict[str, dict[int, Any]], grid_rows: dict[str, dict[int, Any]],
                 summaries: dict[int, Any], labels: dict[str, str]) -> list[str]:
    md = ["## Search budget: AutoBalance against a grid search selected on the same held-out split", "",
          f"Grid: logit adjustment tau in {list(args.la_taus)}; "
          + (f"VS gamma in {list(args.vs_gammas)} x tau in {list(args.vs_taus)}" if args.vs_gammas and args.vs_taus
             else "no VS points") + ". Each point is trained on the search split (the lower 80% per class that the "
          "AutoBalance search trains on, same seed, same epochs as the search) and scored on the upper 20% by "
          + ("balanced error (ties: balanced cross-entropy there)" if args.grid_select == "balanced_error" else
             "its worst class's error (ties: balanced error, then balanced cross-entropy there)")
          + "; the chosen point is retrained on the whole training set "
          "(as a pipeline baseline with `--model.preset_kwargs`) and tested.", ""]
    ran_autobalance = AUTOBALANCE in args.methods  # a grid run on its own has no AutoBalance row to compare with
    both = {**({AUTOBALANCE: rows.get(AUTOBALANCE, {})} if ran_autobalance else {}), **grid_rows}
    md += table(both, args.seeds, labels, AUTOBALANCE if ran_autobalance else None)
    md.append("")
    ab = _ok(rows.get(AUTOBALANCE, {}))
    md += ["Training compute per seed (epochs over the search split = |lower| images, over the whole set = |train| "
           "images; images = epochs x set size; the hyper steps of AutoBalance each add roughly one training "
           "step of compute, one extra forward and backward pass):", "",
           "| method | search-split epochs | whole-set epochs | images seen (mean per seed) | hyper steps | "
           "wall time s (mean per seed) |", "|---|---|---|---|---|---|"]
    if ab:
        s0 = next(iter(summaries.values()), None)
        lower = s0["points"][0]["train_images"] if s0 and s0["points"] else None
        r0 = next(iter(ab.values()))
        search_ep = args.search_epochs
        retrain_ep = args.retrain_epochs
        full = None
        counts = collect(ROOT / args.runs_dir / args.name, args.seeds, [])[1]
        if counts:
            full = int(sum(next(iter(counts.values()))))
        images = (search_ep * lower + retrain_ep * full) if lower and full else None
        hs = np.mean([r.get("hyper_steps") or 0 for r in ab.values()])
        md.append(f"| {labels[AUTOBALANCE]} | {search_ep} | {retrain_ep} | {images if images else '-'} | "
                  f"{hs:.0f} | {np.mean([r['time_s'] for r in ab.values()]):.0f} |")
        del r0
    for key, per in grid_rows.items():
        ok = _ok(per)
        if not ok:
            continue
        r = next(iter(ok.values()))
        full_images = None
        counts = collect(ROOT / args.runs_dir / args.name, args.seeds, [])[1]
        if counts:
            full_images = int(sum(next(iter(counts.values()))))
        imgs = np.mean([x["grid_images"] for x in ok.values()]) + (args.retrain_epochs * full_images
                                                                    if full_images else 0)
        md.append(f"| {labels.get(key, key)} | {r['grid_epochs']} | {args.retrain_epochs} | {imgs:.0f} | - | "
                  f"{np.mean([x['time_s'] for x in ok.values()]):.0f} |")
    md.append("")
    md += ["Chosen points (seed: LA grid, VS grid, LA + VS):", ""]
    for s, summ in summaries.items():
        ch = summ["chosen"]
        md.append(f"* seed {s}: " + ", ".join(ch[k]["point"] if k in ch else "-" for k in ("la", "vs", "all")))
    md.append("")
    md += ["Upper-split errors of every grid point (mean over seeds; the selection criterion is "
           f"`{args.grid_select}`):", "",
           "| point | upper balanced error % | upper worst-class error % | upper balanced CE |", "|---|---|---|---|"]
    names = [p[0] for p in grid_points(args.la_taus, args.vs_gammas, args.vs_taus)]
    for n in names:
        vals = [p for summ in summaries.values() for p in summ["points"] if p["point"] == n]
        if vals:
            md.append(f"| {n} | {_pm([v['upper_balanced_error'] for v in vals])} | "
                      f"{_pm([_upper_worst(v) for v in vals])} | "
                      f"{_pm([v['upper_balanced_ce'] for v in vals], scale=1.0, digits=3)} |")
    md.append("")
    commands = [c["command"] for summ in list(summaries.values())[:1] for c in summ["chosen"].values()]
    if commands:
        md += ["Retraining commands of the chosen points (first seed):", "", "```", *dict.fromkeys(commands), "```",
               ""]
    return md


# ----------------------------------------------------------------------------------------------------------------


def _config_epochs(config: Path, overlays: Sequence[Path] = ()) -> tuple[int, int, dict[str, Any]]:
    """Epochs of the search and the retraining: from the config, then from overlay configs given with
    ``--set=--config=<file>`` (later files win, as in the CLI)."""
    cfg = yaml.safe_load(config.read_text()) or {}
    max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
    search, retrain = cfg.get("search_epochs"), cfg.get("retrain_epochs")
    for overlay in overlays:
        extra = yaml.safe_load(overlay.read_text()) or {}
        max_epochs = (extra.get("trainer") or {}).get("max_epochs", max_epochs)
        search, retrain = extra.get("search_epochs", search), extra.get("retrain_epochs", retrain)
    search = search or max_epochs
    retrain = retrain or max_epochs
    if search is None or retrain is None:
        raise SystemExit(f"{config}: cannot tell the number of epochs (search_epochs / retrain_epochs / "
                         "trainer.max_epochs)")
    return int(search), int(retrain), cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="a lightning-autobalance pipeline YAML")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--name", help="name of the runs folder and the docs files (default: the config's stem)")
    parser.add_argument("--title", help="title of the markdown")
    parser.add_argument("--runs-dir", default="runs/quality")
    parser.add_argument("--docs-dir", default="docs/results")
    parser.add_argument("--grid", action="store_true", help="add the grid-search comparison")
    parser.add_argument("--la-taus", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--vs-gammas", type=float, nargs="*", default=[0.05, 0.15, 0.3],
                        help="VS's gamma values of the grid (none: no VS points)")
    parser.add_argument("--vs-taus", type=float, nargs="*", default=[0.5, 1.0, 1.5])
    parser.add_argument("--grid-select", choices=sorted(SELECT), default="balanced_error",
                        help="the upper-split criterion that picks a grid point")
    parser.add_argument("--drw-fraction", type=float, default=0.8,
                        help="when the config leaves LDAM-DRW's drw_epoch (baseline_losses) unset or beyond the "
                             "retraining, LDAM-DRW "
                             "switches to class-balanced weights at this fraction of the retraining epochs (the "
                             "paper: 160 of 200)")
    parser.add_argument("--search-model", action="store_true",
                        help="also test the model the search ended with (its last checkpoint) on the test set and "
                             "the upper split, beside the retrained one")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the training processes")
    parser.add_argument("--report-only", action="store_true", help="aggregate the finished runs, train nothing")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="ARG",
                        help="extra lightning-autobalance arguments for every run (e.g. --set=--trainer.foo=1); "
                             "may be repeated; --set=--config=<file> adds an overlay config")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.name = args.name or args.config.stem
    overlays = [Path(a.split("=", 1)[1]) for a in args.set if a.startswith("--config=")]
    args.search_epochs, args.retrain_epochs, cfg = _config_epochs(args.config, overlays)
    extra = list(args.set)
    losses = dict(cfg.get("baseline_losses") or {})
    drw = ((losses.get("ldam_drw") or {}).get("init_args") or {}).get("drw_epoch", 160)
    if "ldam_drw" in args.methods and (drw is None or drw >= args.retrain_epochs):
        losses["ldam_drw"] = {"class_path": "lightning_autobalance.core.losses.LDAMLoss",
                              "init_args": {"drw_epoch": int(args.drw_fraction * args.retrain_epochs)}}
        extra += ["--baseline_losses", json.dumps(losses)]
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        import torch

        torch.set_num_threads(args.threads)
    runs = (ROOT / args.runs_dir if not Path(args.runs_dir).is_absolute() else Path(args.runs_dir)) / args.name
    commands: dict[int, dict[str, str]] = {}
    points = grid_points(args.la_taus, args.vs_gammas, args.vs_taus)
    t0 = time.perf_counter()
    for s in args.seeds:
        out = runs / f"seed_{s}"
        if args.report_only:
            commands[s] = {"all": _show(pipeline_args(args.config, s, out, args.methods, extra))}
        else:
            commands[s] = run_seed(args.config, s, out, args.methods, extra, env)
        if args.search_model and AUTOBALANCE in args.methods:  # evaluation only: also with --report-only
            evaluate_search_model(args.config, s, out, extra)
        if args.report_only:
            continue
        if args.grid:
            t1 = time.perf_counter()
            run_grid(args.config, s, out, points, extra, env, args.grid_select)
            print(f"[seed {s}] grid done in {time.perf_counter() - t1:.0f} s", flush=True)
    if not args.report_only:
        print(f"all seeds done in {time.perf_counter() - t0:.0f} s", flush=True)
    write_report(args, runs, commands, extra)


if __name__ == "__main__":
    main()
