"""The searched per-class augmentation strengths of a quality run, per seed, tail against head (issue 33).

For every seed folder of a ``benchmarks/quality.py`` run whose search named ``"augment"``
(``<runs>/seed_<s>/search``), it reads:

* the strengths the search ended with, per table and class: the last value logged as
  ``autobalance/augment/<table>/<class>`` in the search's ``logs/metrics.csv`` (logged at every hyper step, so this
  is the searched value, before the held-back check rules on it);
* the training counts of the search split and the check's decision, from the search's ``checkpoints/last.ckpt``;
* with ``--search-model`` results (``search/search_model.json``), the search model's upper-split objective against
  its fixed-start twin (the same model, split and epochs, the start loss and start strengths held fixed).

Prints a markdown table per seed and the objectives, and writes ``<out>_strengths.png`` (strength against the class's
training count, log scale, one line per seed, the start strength dashed) and ``<out>_strengths.json``.

Example::

    python benchmarks/augment_strengths.py --runs runs/quality/cifar10_lt16_augment_search --seeds 0 1 2 \\
        --out docs/results/cifar10_lt16_augment_search
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

PREFIX = "autobalance/augment/"


def last_logged(metrics: Path) -> dict[str, dict[int, float]]:
    """``{table: {class: strength}}``: the last non-empty value of every ``autobalance/augment/<table>/<class>``
    column (per class columns only; a run with too many classes logs min/max/mean, refused here)."""
    last: dict[str, float] = {}
    with metrics.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key and key.startswith(PREFIX) and value not in ("", None):
                    last[key] = float(value)
    if not last:
        raise SystemExit(f"{metrics}: no {PREFIX}<table>/<class> column; was 'augment' searched?")
    tables: dict[str, dict[int, float]] = {}
    for key, value in last.items():
        table, cell = key[len(PREFIX):].rsplit("/", 1)
        if not cell.isdigit():
            raise SystemExit(f"{metrics}: column {key!r} is not per class (too many classes were logged as a "
                             "summary; raise the callback's log_max_classes)")
        tables.setdefault(table, {})[int(cell)] = value
    return tables


def checkpoint_facts(ckpt: Path) -> dict[str, Any]:
    """The search split's class counts, the augmentation's settings and start, and the decision, from a checkpoint."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    counts = state["autobalance_augmentation.class_counts"]
    extra = state.get("autobalance_augmentation._extra_state") or {}
    loss_extra = state.get("autobalance._extra_state") or {}
    return {"counts": [round(float(c)) for c in counts.reshape(-1)], "settings": extra.get("settings"),
            "start": extra.get("start") or {}, "decision": (loss_extra.get("decision") or {}).get("decision")}


def start_strength(table: str, settings: dict[str, Any] | None, start: dict[str, float]) -> float:
    """The start strength of ``table``: ``start`` when given, else half of the op's limit (``initial_params``)."""
    if table in start:
        return float(start[table])
    limits = {"mix": "max_mix", "shift": "max_shift", "erase": "max_erase", "noise": "max_noise"}
    if table in limits and settings:
        return float(settings.get(limits[table], float("nan"))) / 2
    return 0.5  # flip and the gates' probabilities


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="a quality run's folder (holding seed_<s>/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True, help="path prefix of the PNG and JSON written")
    args = parser.parse_args(argv)
    command = "python benchmarks/augment_strengths.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {"command": command, "seeds": {}}
    for seed in args.seeds:
        search = args.runs / f"seed_{seed}" / "search"
        tables = last_logged(search / "logs" / "metrics.csv")
        facts = checkpoint_facts(search / "checkpoints" / "last.ckpt")
        model = search / "search_model.json"
        objectives = None
        if model.is_file():
            sm = json.loads(model.read_text())
            objectives = {"search_model_upper_balanced_error": sm["upper"]["balanced_error"],
                          "start_twin_upper_balanced_error": sm["start_upper"]["balanced_error"],
                          "search_model_upper_balanced_ce": sm["upper"].get("balanced_ce"),
                          "start_twin_upper_balanced_ce": sm["start_upper"].get("balanced_ce")}
        report["seeds"][seed] = {"counts": facts["counts"], "decision": facts["decision"],
                                 "strengths": {t: [v[c] for c in sorted(v)] for t, v in tables.items()},
                                 "start": {t: start_strength(t, facts["settings"], facts["start"]) for t in tables},
                                 "objectives": objectives}
    print(f"{command}\n")
    for seed, r in report["seeds"].items():
        names = sorted(r["strengths"])
        print(f"seed {seed} (decision: {r['decision']}); start: "
              + ", ".join(f"{t} {r['start'][t]:.4f}" for t in names))
        print("| class | training count | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for c, n in enumerate(r["counts"]):
            print(f"| {c} | {n} | " + " | ".join(f"{r['strengths'][t][c]:.4f}" for t in names) + " |")
        o = r["objectives"]
        if o:
            print(f"upper balanced error: search model {100 * o['search_model_upper_balanced_error']:.2f}%, "
                  f"fixed-start twin {100 * o['start_twin_upper_balanced_error']:.2f}%")
        print()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + "_strengths.json").write_text(json.dumps(report, indent=2))
    _plot(report, args.out.with_name(args.out.name + "_strengths.png"))


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({t for r in report["seeds"].values() for t in r["strengths"]})
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, table in zip(axes[0], names):
        for seed, r in report["seeds"].items():
            if table in r["strengths"]:
                ax.plot(r["counts"], r["strengths"][table], marker="o", label=f"seed {seed}")
                start = r["start"][table]
        if not math.isnan(start):
            ax.axhline(start, linestyle="--", color="grey", label="start")
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class (search split)")
        ax.set_ylabel(f"{table} strength")
        ax.set_title(f"searched {table}, per class")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
