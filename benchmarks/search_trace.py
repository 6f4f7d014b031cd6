"""Where did the search go? Traces of finished ``benchmarks/quality.py`` searches, read from their logs.

For every ``<runs>/seed_<s>/search/logs/metrics.csv`` (``one_phase/logs/`` with ``--stage one_phase``; the callback
logs the per-class offset table at every hyper step; a resumed search's earlier attempts are in ``metrics.1.csv``,
``metrics.2.csv``, ..., and are read first, each cut where the next attempt resumed) it computes, per hyper step,

* the effective ``tau``: the least-squares slope of the (centred) offsets on the (centred) ``log pi`` of the search
  split's class counts (0 for cross-entropy, 1 for logit adjustment);
* the residual: the offsets minus ``tau * log pi`` (centred), i.e. what the search does per class beyond the
  shared direction;
* the upper objective the callback reports,

and draws them (one line per seed) into ``<out>.png``, with the final residual against class count. Prints the
final values as markdown.

Example::

    python benchmarks/search_trace.py runs/quality/cifar10_lt_jpeg_short_from_ce \\
        --out docs/results/cifar10_lt_jpeg_short_from_ce_trace
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml


def attempts(log_dir: Path) -> list[Path]:
    """The search's metric files in the order they were written: ``metrics.1.csv``, ``metrics.2.csv``, ...
    (interrupted attempts, moved aside by the pipeline), then ``metrics.csv`` (the attempt that finished)."""
    earlier = sorted(log_dir.glob("metrics.*.csv"), key=lambda f: int(f.name.split(".")[1]))
    last = log_dir / "metrics.csv"
    return [*earlier, last] if last.is_file() else []


def read_rows(log_dir: Path) -> list[dict[str, str]]:
    """The rows of every attempt, each attempt cut at the first step the next one logged (it resumed there and
    logged those steps again)."""
    per_attempt = []
    for path in attempts(log_dir):
        with path.open() as fh:
            per_attempt.append([row for row in csv.DictReader(fh) if row.get("step")])
    rows: list[dict[str, str]] = []
    for i, attempt in enumerate(per_attempt):
        later = [int(r["step"]) for nxt in per_attempt[i + 1:] for r in nxt]
        cut = min(later, default=None)
        rows += [r for r in attempt if cut is None or int(r["step"]) < cut]
    return rows


def trace(seed_dir: Path, stage: str = "search") -> dict[str, np.ndarray] | None:
    log_dir = seed_dir / stage / "logs"
    # the search's loss is copied up to the seed folder; a one-phase run keeps its own
    loss_file = seed_dir / "found_loss.yaml" if stage == "search" else seed_dir / stage / "found_loss.yaml"
    if not (log_dir / "metrics.csv").is_file() or not loss_file.is_file():
        return None
    counts = np.asarray(yaml.safe_load(loss_file.read_text())["class_counts"], dtype=float).reshape(-1)
    log_pi = np.log(counts / counts.sum())
    centred_prior = log_pi - log_pi.mean()
    k = counts.size
    steps, taus, objective, residuals = [], [], [], []
    for row in read_rows(log_dir):
        cells = [row.get(f"autobalance/offset/{c:0{len(str(k - 1))}d}", "") for c in range(k)]
        if not all(cells):
            continue
        offset = np.asarray([float(v) for v in cells])
        offset -= offset.mean()
        tau = float(offset @ centred_prior / (centred_prior @ centred_prior))
        steps.append(int(row["step"]))
        taus.append(tau)
        objective.append(float(row.get("autobalance/objective") or "nan"))
        residuals.append(offset - tau * centred_prior)
    if not steps:
        return None
    return {"counts": counts, "step": np.asarray(steps), "tau": np.asarray(taus),
            "objective": np.asarray(objective), "residual": np.asarray(residuals)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG path without suffix")
    p.add_argument("--stage", default="search", choices=("search", "one_phase"),
                   help="the stage whose search is traced: the two-phase search (default) or the one-phase run")
    args = p.parse_args()
    traces = {int(d.name.split("_")[-1]): t for d in sorted(args.runs.glob("seed_*")) if (t := trace(d, args.stage))}
    if not traces:
        raise SystemExit(f"no search logs under {args.runs}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    print("| seed | hyper steps | final effective tau | largest |residual| (class) | result rows |")
    print("|---|---|---|---|---|")
    for seed, t in sorted(traces.items()):
        axes[0].plot(t["step"], t["tau"], label=f"seed {seed}")
        axes[1].plot(t["step"], t["objective"], label=f"seed {seed}", alpha=0.7)
        axes[2].semilogx(t["counts"], t["residual"][-1], "o-", label=f"seed {seed}")
        last = t["residual"][-1]
        c = int(np.abs(last).argmax())
        results = json.loads((args.runs / f"seed_{seed}" / "results.json").read_text())
        errors = ", ".join(f"{r['method']} {100 * r['balanced_error']:.2f}" for r in results["rows"])
        print(f"| {seed} | {len(t['step'])} | {t['tau'][-1]:.3f} | {last[c]:+.3f} ({c}) | {errors} |")
    axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes[0].set(xlabel="optimizer step", ylabel="effective tau (slope of offsets on log pi)",
                title="shared direction (1 = logit adjustment)")
    axes[1].set(xlabel="optimizer step", ylabel="upper objective", title="upper objective at each hyper step")
    axes[2].axhline(0.0, color="grey", linewidth=1)
    axes[2].set(xlabel="search-split class count", ylabel="final residual offset",
                title="per-class residual beyond tau log pi")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=90)
    print(f"\nwrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
