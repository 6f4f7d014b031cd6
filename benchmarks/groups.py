"""The group benchmark (coloured digits): AutoBalance with fairness objectives against group baselines, over seeds.

For every seed ``s`` it runs, each in its own process (one thread),

    lightning-autobalance pipeline --config examples/colored_digits.yaml \\
        --seed_everything s --data.init_args.seed s --output_dir OUT/seed{s}
    lightning-autobalance pipeline --config examples/colored_digits.yaml \\
        --config examples/colored_digits_worst_group.yaml \\
        --seed_everything s --data.init_args.seed s --output_dir OUT/seed{s}_worst_group

(the seed sets the model's initial weights, which training images carry the minority colour, and the search split;
the test images stay the same) and then prints a markdown table of the mean (and standard error) over seeds of the
worst-group error, the average error and the equal-opportunity gap of every method, from the ``results.json`` files.
Finished stages are skipped when rerun (the pipeline resumes).

Usage::

    python benchmarks/groups.py                       # seeds 0 1 2, runs/groups, about 5 minutes on 2 cores
    python benchmarks/groups.py --seeds 0 1 2 --out runs/groups --table-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples" / "colored_digits.yaml"
WORST = ROOT / "examples" / "colored_digits_worst_group.yaml"
LABELS = {
    "autobalance": "AutoBalance, blend 0.5 cell-balanced CE + 0.5 DEO",
    "autobalance_worst_group": "AutoBalance, smooth worst-group objective",
    "ce": "cross-entropy",
    "group_balanced": "group-balanced reweighting",
    "group_dro": "online group DRO",
    "la": "group logit adjustment (the search's start)",
    "la_uniform": "group LA + uniform augmentation (start strengths)",
    "la_cuda": "group LA + CUDA (per-class augmentation curriculum)",
}
METRICS = (("worst_group_error", "worst-group error %"), ("average_error", "average error %"),
           ("eo_gap", "EO gap %"))


def run(seed: int, out: Path, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed),
              "--trainer.enable_progress_bar", "false", *extra]
    cli = [sys.executable, "-m", "lightning_autobalance.runner.cli", "pipeline"]
    subprocess.run([*cli, "--config", str(MAIN), *common, "--output_dir", str(out / f"seed{seed}")], check=True,
                   env=env, cwd=ROOT)
    subprocess.run([*cli, "--config", str(MAIN), "--config", str(WORST), *common,
                    "--output_dir", str(out / f"seed{seed}_worst_group")], check=True, env=env, cwd=ROOT)


def collect(seeds: list[int], out: Path) -> dict[str, dict[str, list[float]]]:
    table: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        for folder, suffix in ((f"seed{seed}", ""), (f"seed{seed}_worst_group", "_worst_group")):
            results = json.loads((out / folder / "results.json").read_text())
            for row in results["rows"]:
                if suffix and row["method"] != "autobalance":
                    continue  # the baselines of the second run are the first's again (same seed, same settings)
                method = row["method"] + (suffix if row["method"] == "autobalance" else "")
                entry = table.setdefault(method, {key: [] for key, _ in METRICS})
                for key, _ in METRICS:
                    entry[key].append(100.0 * row[key])
    return table


def markdown(table: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    def cell(values: list[float]) -> str:
        mean = sum(values) / len(values)
        if len(values) < 2:
            return f"{mean:.2f}"
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
        return f"{mean:.2f} ± {se:.2f}"

    lines = ["| method | " + " | ".join(label for _, label in METRICS) + " | per seed (worst-group) |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    order = sorted(table, key=lambda m: sum(table[m]["worst_group_error"]) / len(table[m]["worst_group_error"]))
    for method in order:
        per_seed = ", ".join(f"{v:.1f}" for v in table[method]["worst_group_error"])
        lines.append(f"| {LABELS.get(method, method)} | "
                     + " | ".join(cell(table[method][key]) for key, _ in METRICS) + f" | {per_seed} |")
    return "\n".join(lines) + f"\n\nMean ± standard error over seeds {seeds}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "groups")
    parser.add_argument("--table-only", action="store_true", help="only read the results.json files")
    parser.add_argument("extra", nargs="*", help="further CLI arguments for every run (after --)")
    args = parser.parse_args()
    if not args.table_only:
        for seed in args.seeds:
            run(seed, args.out, args.extra)
    print(markdown(collect(args.seeds, args.out), args.seeds))


if __name__ == "__main__":
    main()
