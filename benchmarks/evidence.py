"""The evidence tables of "does the search pay", read from finished ``benchmarks/quality.py`` runs.

Every pipeline run writes ``<runs>/seed_<s>/results.json`` with one row per method (balanced, worst-class and
per-class test errors). This script pairs rows by seed (same data, same initial weights) and prints markdown:

* ``scratch``: AutoBalance started from plain cross-entropy against CE and LA: the share of the CE-to-LA gap in
  balanced test error that the search recovers, ``(CE - AB) / (CE - LA)`` (of the means, and per seed).
* ``one-phase``: the one-phase run beside the two-phase pipeline, LA and CE: balanced error, the paired differences
  that its targets name, and its cost: its training time over LA's (a plain training of the same epochs, timed in
  the same pipeline process), and the two-phase pipeline's (search + retraining) over LA's.
* ``versus``: AutoBalance against one baseline, paired: balanced and worst-class error differences (with
  ``--per-class`` also every class's test error per seed), with the
  baseline's rows taken from the same runs folder or from ``--baseline-runs`` (another benchmark of the same
  seeds, e.g. an AutoBalance run with another objective against the LA rows of a first run). The retrained points
  of a ``quality.py --grid`` run count as methods ``grid_la``, ``grid_vs`` and ``grid_all``.

Each ``runs`` argument may also be the ``docs/results/<name>.json`` written beside a ``quality.py`` report: the
same rows per seed, committed, so that the tables can be made again after the runs folder is gone.

Example::

    python benchmarks/evidence.py scratch runs/quality/digits_lt_from_ce
    python benchmarks/evidence.py versus runs/quality/digits_lt --baseline la
    python benchmarks/evidence.py one-phase runs/quality/digits_lt_one_phase
    python benchmarks/evidence.py versus runs/quality/cifar_worst --baseline la --baseline-runs runs/quality/cifar_ce
    python benchmarks/evidence.py versus runs/quality/digits_worst --baseline grid_la --baseline-runs runs/quality/grid
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def load(runs: Path) -> dict[int, dict[str, dict]]:
    """``{seed: {method: row}}`` of every finished seed folder, or of the ``<name>.json`` that ``quality.py`` writes
    beside its report (the same rows, kept in docs/results when the runs folder is gone)."""
    if runs.suffix == ".json":
        seeds = json.loads(runs.read_text())["seeds"]
        return {int(s): rows for s, rows in seeds.items()}
    out: dict[int, dict[str, dict]] = {}
    for folder in sorted(runs.glob("seed_*")):
        rows: dict[str, dict] = {}
        for stage in sorted(folder.glob("*/result.json")):  # every finished stage, also of partial reruns
            doc = json.loads(stage.read_text())
            if "balanced_error" in doc:
                rows[doc["method"]] = doc
        summary = folder / "results.json"
        if summary.is_file():
            rows.update({r["method"]: r for r in json.loads(summary.read_text())["rows"]})
        grid = folder / "grid" / "summary.json"
        if grid.is_file():  # quality.py --grid: the chosen LA / VS points, retrained, as methods grid_la / grid_vs
            for family, chosen in json.loads(grid.read_text())["chosen"].items():
                preset = chosen["point"].split("_")[0]  # points are named la_tau<t> or vs_g<g>_tau<t>
                result = folder / "grid_retrain" / chosen["point"] / preset / "result.json"
                if result.is_file() and "balanced_error" in (doc := json.loads(result.read_text())):
                    rows[f"grid_{family}"] = doc
        if rows:
            out[int(folder.name.split("_")[-1])] = rows
    if not out:
        raise SystemExit(f"no seed_*/results.json under {runs}")
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


def fmt(values: list[float]) -> str:
    m, se = mean_se(values)
    return f"{100 * m:.2f} ± {100 * se:.2f}"


def scratch(runs: Path) -> str:
    rows = load(runs)
    seeds = [s for s in sorted(rows) if {"autobalance", "ce", "la"} <= set(rows[s])]
    err = {m: [rows[s][m]["balanced_error"] for s in seeds] for m in ("autobalance", "ce", "la")}
    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")  # no gap between CE and LA: nothing to recover

    per_seed = [ratio(ce - ab, ce - la) for ab, ce, la in zip(err["autobalance"], err["ce"], err["la"])]
    means = {m: mean_se(v)[0] for m, v in err.items()}
    share = ratio(means["ce"] - means["autobalance"], means["ce"] - means["la"])
    lines = [f"Runs: `{runs}`, seeds {seeds}. Balanced test error %, mean ± SE.", "",
             "| AutoBalance from CE | CE | LA | gap recovered (of the means) | per seed | AB - LA, paired (pp) |",
             "|---|---|---|---|---|---|",
             f"| {fmt(err['autobalance'])} | {fmt(err['ce'])} | {fmt(err['la'])} | {100 * share:.0f}% | "
             f"{', '.join(f'{100 * p:.0f}%' for p in per_seed)} | "
             f"{fmt([a - b for a, b in zip(err['autobalance'], err['la'])])} |", "",
             f"Target (at least 75% of the CE-to-LA gap): **{'met' if share >= 0.75 else 'missed'}** "
             f"({100 * share:.0f}%)."]
    return "\n".join(lines)


def one_phase(runs: Path) -> str:
    rows = load(runs)
    methods = ("one_phase", "autobalance", "la", "ce")
    seeds = [s for s in sorted(rows) if set(methods) <= set(rows[s])]
    if not seeds:
        raise SystemExit(f"no seed under {runs} has all of {methods}")
    err = {m: [rows[s][m]["balanced_error"] for s in seeds] for m in methods}
    plain = [rows[s]["la"]["fit_time_s"] for s in seeds]
    cost = {"one_phase": [rows[s]["one_phase"]["fit_time_s"] / p for s, p in zip(seeds, plain)],
            "autobalance": [(rows[s]["autobalance"]["fit_time_s"] + rows[s]["autobalance"].get("search_time_s", 0.0))
                            / p for s, p in zip(seeds, plain)],
            "la": [1.0] * len(seeds), "ce": [rows[s]["ce"]["fit_time_s"] / p for s, p in zip(seeds, plain)]}
    labels = {"one_phase": "AutoBalance one-phase", "autobalance": "AutoBalance two-phase (search + retrain)",
              "la": "LA", "ce": "CE"}

    def median(v: list[float]) -> float:
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])

    lines = [f"Runs: `{runs}`, seeds {seeds}. Balanced test error %, mean ± SE; cost: training wall time over LA's "
             "(same process), median over seeds.", "",
             "| method | balanced error | cost (LA = 1) | hyper steps |", "|---|---|---|---|"]
    for m in methods:
        steps = [rows[s][m].get("hyper_steps") for s in seeds]
        steps_text = ", ".join(str(h) for h in steps) if all(h is not None for h in steps) else "-"
        lines.append(f"| {labels[m]} | {fmt(err[m])} | {median(cost[m]):.2f} | {steps_text} |")
    two = [a - b for a, b in zip(err["one_phase"], err["autobalance"])]
    la = [a - b for a, b in zip(err["one_phase"], err["la"])]
    m_two, se_two = mean_se(err["autobalance"])
    m_la, se_la = mean_se(err["la"])
    m_one = mean_se(err["one_phase"])[0]
    lines += ["", f"One-phase - two-phase, paired: {fmt(two)} pp; one-phase - LA, paired: {fmt(la)} pp.", "",
              f"* Cost at most 1.15 plain runs: **{'met' if median(cost['one_phase']) <= 1.15 else 'missed'}** "
              f"({median(cost['one_phase']):.2f}).",
              f"* Within one SE of the two-phase pipeline ({100 * m_two:.2f} ± {100 * se_two:.2f}): "
              f"**{'met' if abs(m_one - m_two) <= se_two else 'missed'}** ({100 * m_one:.2f}).",
              f"* At or below LA + one SE ({100 * (m_la + se_la):.2f}): "
              f"**{'met' if m_one <= m_la + se_la else 'missed'}**."]
    return "\n".join(lines)


def versus(runs: Path, baseline: str, baseline_runs: Path | None, per_class: bool = False,
           method: str = "autobalance") -> str:
    rows = load(runs)
    base = load(baseline_runs) if baseline_runs else rows
    name = {"autobalance": "AutoBalance", "one_phase": "AutoBalance one-phase"}.get(method, method)
    seeds = [s for s in sorted(rows) if method in rows[s] and s in base and baseline in base[s]]
    if not seeds:
        raise SystemExit(f"no seed has both a {method!r} row in {runs} and a {baseline!r} row in "
                         f"{baseline_runs or runs}: nothing to pair.")
    lines = [f"Runs: `{runs}`" + (f", {baseline} from `{baseline_runs}`" if baseline_runs else "") +
             f", seeds {seeds}. Test error %, mean ± SE; differences paired by seed (negative: {name} lower).",
             "", f"| metric | {name} | {baseline} | {name} - {baseline}, paired (pp) | per seed (pp) |",
             "|---|---|---|---|---|"]
    for key, label in (("balanced_error", "balanced error"), ("worst_class_error", "worst-class error")):
        a = [rows[s][method][key] for s in seeds]
        b = [base[s][baseline][key] for s in seeds]
        diff = [x - y for x, y in zip(a, b)]
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(diff)} | "
                     f"{', '.join(f'{100 * d:+.2f}' for d in diff)} |")
    if per_class:
        lines += ["", f"| class | {name} per seed | {baseline} per seed | {name} - {baseline}, paired (pp) |",
                  "|---|---|---|---|"]
        for c in range(len(rows[seeds[0]][method]["per_class_error"])):
            a = [rows[s][method]["per_class_error"][c] for s in seeds]
            b = [base[s][baseline]["per_class_error"][c] for s in seeds]
            lines.append(f"| {c} | {', '.join(f'{100 * x:.1f}' for x in a)} | {', '.join(f'{100 * x:.1f}' for x in b)}"
                         f" | {fmt([x - y for x, y in zip(a, b)])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="table", required=True)
    s = sub.add_parser("scratch", help="AutoBalance from CE: share of the CE-to-LA gap recovered")
    s.add_argument("runs", type=Path)
    v = sub.add_parser("versus", help="AutoBalance against one baseline, paired by seed")
    v.add_argument("runs", type=Path)
    v.add_argument("--baseline", default="la")
    v.add_argument("--baseline-runs", type=Path, default=None)
    v.add_argument("--per-class", action="store_true", help="also each class's test error, per seed")
    v.add_argument("--method", default="autobalance", help="the row compared: autobalance (default) or one_phase")
    o = sub.add_parser("one-phase", help="the one-phase run beside two-phase, LA and CE: error and cost")
    o.add_argument("runs", type=Path)
    args = p.parse_args()
    if args.table == "scratch":
        print(scratch(args.runs))
    elif args.table == "one-phase":
        print(one_phase(args.runs))
    else:
        print(versus(args.runs, args.baseline, args.baseline_runs, args.per_class, args.method))


if __name__ == "__main__":
    main()
