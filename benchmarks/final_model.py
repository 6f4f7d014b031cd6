"""The model you keep, from the recommended path (issue 34): ``find_loss`` then your own ``trainer.fit``, against LA.

For every seed, from one ``lightning-autobalance`` config (its model, datamodule and trainer settings):

* **find_loss + fit**: :func:`lightning_autobalance.find_loss` on a copy of the model (the config's AutoBalance
  defaults, the datamodule's training set split per class), then a plain fit of the model on the whole training set
  with the decided loss, frozen (no callback);
* **LA**: the same model, data, epochs and seed, trained with logit adjustment.

Both final fits start from the same initial weights and the same random state (re-seeded after ``find_loss``), so
where the check puts LA back the two models are the same. Both are tested on the datamodule's test set (balanced
error). Also reported: the held-back check's decision and
the cost of the recommended path in plain trainings (``find_loss`` + fit wall time over the LA fit's, measured in the
same process, one after the other).

Example::

    python benchmarks/final_model.py --config examples/digits_lt.yaml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

from lightning_autobalance import find_loss
from lightning_autobalance.runner.pipeline import BASELINES, _clone, _counts, _data


def run_seed(config: Path, seed: int, extra: tuple[str, ...], out: Path) -> dict[str, Any]:
    import pytorch_lightning as pl

    model_t, dm_t, trainer_kwargs, pipeline_kwargs = quality._templates(config, seed, extra)
    epochs = int(pipeline_kwargs.get("retrain_epochs") or trainer_kwargs.get("max_epochs") or 1)
    callback = next((c for c in trainer_kwargs.get("callbacks") or [] if type(c).__name__ == "AutoBalanceCallback"),
                    None)
    settings = {"fit_tolerance": callback.fit_tolerance} if callback is not None else {}
    rows: dict[str, Any] = {}
    for method in ("la", "find_loss"):
        pl.seed_everything(seed, workers=True, verbose=False)
        dm = _data(dm_t, search_split=False)
        loss = {**BASELINES["la"], "search": (), "loss_file": None, "freeze_loss": False} if method == "la" else {}
        model = _clone(model_t, **_counts(model_t, dm), **{"loss": "autobalance", **loss})
        t0 = time.perf_counter()
        if method == "find_loss":
            kwargs = {"max_epochs": epochs, "accelerator": trainer_kwargs.get("accelerator", "auto"),
                      "devices": trainer_kwargs.get("devices", "auto"), "logger": False,
                      "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                      "limit_val_batches": 0, "default_root_dir": str(out / f"seed_{seed}")}
            found = find_loss(model, datamodule=dm, trainer_kwargs=kwargs, callback_kwargs=settings, seed=seed)
            rows["decision"] = found.decision
            rows["hyper_steps"] = found.hyper_steps
        search_s = time.perf_counter() - t0
        trainer = quality.plain_trainer(trainer_kwargs, epochs, out / f"seed_{seed}")
        pl.seed_everything(seed, workers=True, verbose=False)  # the final fit draws what LA's draws: paired
        t1 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        fit_s = time.perf_counter() - t1
        dm.setup("test")
        result = quality._evaluate(model, dm.test_dataloader(), dm.num_classes)
        rows[method] = {"balanced_error": result["balanced_error"], "search_s": search_s if method != "la" else 0.0,
                        "fit_s": fit_s}
    rows["cost_in_plain_trainings"] = (rows["find_loss"]["search_s"] + rows["find_loss"]["fit_s"]) / rows["la"]["fit_s"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="extra lightning-autobalance arguments")
    parser.add_argument("--out", type=Path, default=Path("runs/final_model"))
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    command = "python benchmarks/final_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    per_seed = {s: run_seed(args.config, s, tuple(args.set), args.out) for s in args.seeds}
    diffs = [100 * (r["find_loss"]["balanced_error"] - r["la"]["balanced_error"]) for r in per_seed.values()]
    print(f"\n{command}\n")
    print("| seed | decision | find_loss + fit % | LA % | difference (pp) | cost (plain trainings) |")
    print("|---|---|---|---|---|---|")
    for (s, r), diff in zip(per_seed.items(), diffs):
        decision = (r.get("decision") or {}).get("decision", "no check")
        print(f"| {s} | {decision} | {100 * r['find_loss']['balanced_error']:.2f} | "
              f"{100 * r['la']['balanced_error']:.2f} | {diff:+.2f} | {r['cost_in_plain_trainings']:.2f} |")
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    cost = statistics.median(r["cost_in_plain_trainings"] for r in per_seed.values())
    print(f"\nfind_loss + fit minus LA, paired: {statistics.mean(diffs):+.2f} +- {se:.2f} pp; worst seed "
          f"{max(diffs):+.2f}; median cost {cost:.2f} plain trainings")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, "seeds": per_seed}, indent=2, default=str))


if __name__ == "__main__":
    main()
