"""The default hyper step's cost and a search epoch's cost, this checkout against another checkout of the project
(e.g. the commit before a refactor), measured alternately in fresh processes so that drifts of the machine's load
hit both alike. Each process imports its own checkout's package and ``benchmarks/speed.py`` and reports:

* ``step``: the default hyper step (one-step Neumann, 1 + 1 batches) in plain training steps (ResNet-32, batch
  128, median over ``--repeats``), through the functional core;
* ``epoch``: a search epoch of ``--epoch-steps`` optimizer steps with the callback at its defaults and a hyper step
  every ``--every`` steps, over a plain epoch, both through ``Trainer`` (median over ``--repeats``).

Usage::

    git worktree add /tmp/before <commit>
    python benchmarks/speed_versus.py /tmp/before --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.util, json, sys, torch
torch.set_num_threads({threads})
spec = importlib.util.spec_from_file_location("speed_probe", "{tree}/benchmarks/speed.py")
speed = importlib.util.module_from_spec(spec); spec.loader.exec_module(speed)
import lightning_autobalance
assert lightning_autobalance.__file__.startswith("{tree}"), lightning_autobalance.__file__
cpu = torch.device("cpu")
step = speed.step_costs(speed.Net(), cpu, 10, 128, {repeats}, {{"default": {{}}}})["default"][0]
epoch = speed.epoch_overhead(cpu, {epoch_steps}, {repeats}, {every})
print(json.dumps({{"step": step, "epoch": epoch}}))
"""


def measure(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    code = _PROBE.format(tree=tree, threads=args.threads, repeats=args.repeats, epoch_steps=args.epoch_steps,
                         every=args.every)
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (its root folder)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=4, help="hyper step interval of the timed search epoch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    trees = {"other": args.other.resolve(), "this": HERE}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
            results[name].append(measure(tree, args))
            print(f"round {r} {name}: {results[name][-1]}", flush=True)
    print("| checkout | default hyper step (plain steps) | search epoch / plain epoch |")
    print("|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} ({trees[name]}) | {statistics.median(r['step'] for r in rows):.3f} | "
              f"{statistics.median(r['epoch'] for r in rows):.3f} |")


if __name__ == "__main__":
    main()
