"""The AutoBalance paper's CIFAR-LT protocol, every method in its own process, side by side on one GPU.

The protocol is that of ``examples/cifar10_lt_jpeg.yaml`` (CIFAR-10-LT from the JPEG copy) or
``examples/cifar100_lt.yaml`` (CIFAR-100-LT from the python release): rho 100, ResNet-32, batch 128, SGD lr 0.1
momentum 0.9 weight decay 1e-4, 5 warm-up epochs, steps at epochs 160 and 180; AutoBalance searches for 300 epochs
on the 80% split (hyper steps from epoch 120, every 20 steps, SGD lr 0.01, LA start, Delta and offsets) and retrains
200 epochs; every baseline trains 200 epochs. Rows:

* ``autobalance``: the paper's search settings (the example config as it is);
* ``autobalance_library``: the library's own defaults (``benchmarks/configs/library_search.yaml``);
* the baselines ``la``, ``cdt``, ``ce`` (and any other the pipeline knows).

Each (row, seed) is one ``lightning-autobalance pipeline`` process with its own output folder (its own
``results.json``), all started at once (``--jobs`` at a time) with the images kept on the GPU
(``device_resident``). A wall-clock ``--time-limit`` stops what is still running (its row then says so), so the
whole command fits one device call. ``--scale`` shortens every epoch count of the protocol by one factor (1 = the
paper's). Writes ``<out>/paper_protocol.md`` (the command, the table beside the paper's Table 1) and
``<out>/summary.json``.

    mkdir -p /tmp/cifar10-jpeg && tar xzf cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
    python benchmarks/paper_protocol.py --data /tmp/cifar10-jpeg --out runs/paper --time-limit 520
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"cifar10": ROOT / "examples" / "cifar10_lt_jpeg.yaml", "cifar100": ROOT / "examples" / "cifar100_lt.yaml"}
LIBRARY = ROOT / "benchmarks" / "configs" / "library_search.yaml"
#: Balanced test error (%) of the AutoBalance paper, Table 1 (ResNet-32, rho 100).
PAPER = {
    "cifar10": {"ce": 30.45, "ldam_drw": 26.37, "la": 23.13, "cdt": 20.73, "autobalance": 21.15},
    "cifar100": {"ce": 62.69, "ldam_drw": 59.47, "la": 58.96, "cdt": 57.26, "autobalance": 56.70},
}
OURS = ("autobalance", "autobalance_library")
#: The protocol's epoch counts, scaled together by --scale.
EPOCHS = {"search_epochs": 300, "retrain_epochs": 200, "start_epoch": 120, "milestones": (160, 180),
          "drw_epoch": 160, "warmup_epochs": 5}


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "lightning-autobalance"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lightning-autobalance")
    return [found] if found else [sys.executable, "-m", "lightning_autobalance.runner.cli"]


def scaled_epochs(scale: float) -> list[str]:
    """Overrides that shorten the protocol by ``scale`` (none at 1)."""
    if scale == 1.0:
        return []
    e = {k: (tuple(max(1, round(m * scale)) for m in v) if isinstance(v, tuple) else max(1, round(v * scale)))
         for k, v in EPOCHS.items()}
    return ["--search_epochs", str(e["search_epochs"]), "--retrain_epochs", str(e["retrain_epochs"]),
            "--model.lr_scheduler.init_args.milestones", json.dumps(list(e["milestones"])),
            "--baseline_losses", json.dumps({"ldam_drw": {"class_path": "lightning_autobalance.core.losses.LDAMLoss",
                                                          "init_args": {"drw_epoch": e["drw_epoch"]}}}),
            "--model.lr_scheduler.init_args.warmup_epochs", str(EPOCHS["warmup_epochs"] * scale)]


def run_args(row: str, seed: int, out: Path, args: argparse.Namespace) -> list[str]:
    """The pipeline arguments (after the executable) of one (row, seed)."""
    config = ["--config", str(CONFIGS[args.dataset])]
    if row == "autobalance_library":
        config += ["--config", str(LIBRARY)]
    data = ["--data.init_args.root", args.data]
    if args.dataset == "cifar10":
        data += ["--data.init_args.num_workers", "0", "--data.init_args.device_resident", "true"]
    else:
        data += ["--data.init_args.num_workers", "0", "--data.init_args.device_resident", "true",
                 "--data.init_args.download", "false"]
    search = row in OURS
    scale = scaled_epochs(args.scale)
    if row == "autobalance" and args.scale != 1.0:
        scale += ["--trainer.callbacks.init_args.start_epoch", str(max(1, round(EPOCHS["start_epoch"] * args.scale)))]
    return ["pipeline", *config, "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
            "--output_dir", str(out), "--search", str(search).lower(),
            "--baselines", "[]" if search else f"[{row}]", "--trainer.accelerator", args.accelerator,
            "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", *data, *scale, *args.set]


def launch(runs: dict[tuple[str, int], list[str]], out: Path, jobs: int, time_limit: float, threads: int
           ) -> dict[tuple[str, int], dict[str, Any]]:
    """Runs every command, ``jobs`` at a time, until ``time_limit`` seconds; returns exit status and wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pending, running, done = list(runs), {}, {}
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            key = pending.pop(0)
            folder = out / f"{key[0]}_seed{key[1]}"
            folder.mkdir(parents=True, exist_ok=True)
            log = (folder / "run.log").open("a")
            log.write(f"$ {shlex.join(['lightning-autobalance', *runs[key]])}\n")
            log.flush()
            proc = subprocess.Popen([*_cli(), *runs[key]], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[key] = (proc, log, time.perf_counter())
        time.sleep(0.5)
        over = time.perf_counter() - start > time_limit
        for key, (proc, log, t0) in list(running.items()):
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
            done[key] = {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                         "killed": over}
            del running[key]
        if over:
            for key in pending:
                done[key] = {"returncode": None, "wall_s": 0.0, "killed": True}
            pending = []
    return done


def collect(out: Path, row: str, seed: int) -> dict[str, Any] | None:
    """The row's balanced test error (%) and hyper steps from the pipeline's results.json, or None."""
    path = out / f"{row}_seed{seed}" / "run" / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    method = "autobalance" if row in OURS else row
    found = next((r for r in results.get("rows", []) if r.get("method") == method), None)
    if found is None:
        return None
    return {"balanced_error": 100.0 * found["balanced_error"],
            "hyper_steps": (results.get("search") or {}).get("hyper_steps")}


def _mean_se(values: list[float]) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.2f}"
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))
    return f"{m:.2f} ± {se:.2f}"


def report(args: argparse.Namespace, out: Path, status: dict[tuple[str, int], dict[str, Any]], argv: list[str]) -> str:
    paper = PAPER[args.dataset]
    lines = [f"# The paper's protocol: {'CIFAR-10-LT' if args.dataset == 'cifar10' else 'CIFAR-100-LT'}", "",
             "Command:", "", "```", shlex.join(["python", "benchmarks/paper_protocol.py", *argv]), "```", "",
             f"Epochs scaled by {args.scale:g} (1 = the paper's 300 search + 200 retraining epochs); seeds "
             f"{args.seeds}; balanced test error (%), mean ± standard error over the seeds that finished.", "",
             "| method | ours | finished | hyper steps | paper (Table 1) |", "|---|---|---|---|---|"]
    summary: dict[str, Any] = {"dataset": args.dataset, "scale": args.scale, "seeds": args.seeds, "rows": {}}
    for row in args.rows:
        found = {s: collect(out, row, s) for s in args.seeds}
        errors = [f["balanced_error"] for f in found.values() if f]
        steps = [f["hyper_steps"] for f in found.values() if f and f["hyper_steps"] is not None]
        killed = [s for s in args.seeds if status.get((row, s), {}).get("killed") and not found[s]]
        ref = paper.get("autobalance" if row in OURS else row)
        note = f" (stopped at the time limit: seeds {killed})" if killed else ""
        lines.append(f"| {row} | {_mean_se(errors)} | {len(errors)}/{len(args.seeds)}{note} | "
                     f"{', '.join(str(s) for s in steps) or '-'} | {'-' if ref is None else f'{ref:.2f}'} |")
        summary["rows"][row] = {"balanced_error": errors, "hyper_steps": steps, "paper": ref,
                                "status": {str(s): status.get((row, s)) for s in args.seeds}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = "\n".join(lines) + "\n"
    (out / "paper_protocol.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the extracted CIFAR-10 JPEG copy (train/, test/) or the "
                        "folder holding cifar-100-python")
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="cifar10")
    parser.add_argument("--out", default="runs/paper_protocol")
    parser.add_argument("--rows", nargs="+", default=["autobalance", "autobalance_library", "la", "cdt", "ce"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every epoch count of the protocol")
    parser.add_argument("--jobs", type=int, default=0, help="processes at once (0: all)")
    parser.add_argument("--time-limit", type=float, default=520.0, help="seconds before unfinished runs stop")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    parser.add_argument("--set", action="append", default=[], help="extra pipeline argument (repeatable), e.g. "
                        "--set=--data.init_args.batch_size=64")
    args = parser.parse_args(argv)
    if not Path(args.data).expanduser().is_dir():
        parser.error(f"--data {args.data!r} is not a folder; extract the data first (see the docstring)")
    if not 0 < args.scale <= 1.0:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    args.data = str(Path(args.data).expanduser().resolve())
    out = Path(args.out)
    runs = {(row, s): run_args(row, s, out / f"{row}_seed{s}" / "run", args) for row in args.rows for s in args.seeds}
    jobs = args.jobs or len(runs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // min(jobs, len(runs)))
    t0 = time.perf_counter()
    status = launch(runs, out, jobs, args.time_limit, threads)
    print(report(args, out, status, argv))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0 if all(v["returncode"] == 0 for v in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
