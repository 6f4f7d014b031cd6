"""How noisy is the one-step hypergradient over upper batches? Uniform against class-balanced upper batches.

Trains a model on the lower (80%) part of a search split for ``--epochs`` epochs with the library's default loss
(LA start, hierarchical parametrisation, nothing searched yet), then, at those fixed weights and on one fixed
training batch, takes the library's default hypergradient (one-step Neumann, difference product) with

* the whole upper split as the upper data (the reference ``g_full``: balanced cross-entropy over all of it);
* ``--draws`` single upper batches drawn uniformly (the objective weights classes by inverse upper frequency);
* ``--draws`` single class-balanced upper batches (every class equally often; the objective weighs classes
  equally), as ``AutoBalanceCallback(balanced_upper=True)`` draws them.

and prints, for the per-class offset residuals and for the shared ``tau``, how far single batches fall from
``g_full``: the mean cosine to it, the relative spread ``||g - g_full|| / ||g_full||``, and the share of draws whose
``tau`` component has the sign of ``g_full``'s.

Example::

    python benchmarks/upper_noise.py --data cifar10_jpeg --epochs 3 --draws 30
    python benchmarks/upper_noise.py --data digits --epochs 20
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time
import warnings

import pytorch_lightning as pl
import torch

from lightning_autobalance.core.hypergradient import Batch, FunctionalModel, hypergradient
from lightning_autobalance.core.objectives import build_objective
from lightning_autobalance.data import LongTailDigits, LongTailImageFolder
from lightning_autobalance.lightning.batch_stream import BatchStream
from lightning_autobalance.lightning.classifier import ImbalancedClassifier


def datamodule(name: str, seed: int) -> pl.LightningDataModule:
    if name == "digits":
        return LongTailDigits(imbalance_ratio=100, batch_size=64, search_split=True, seed=seed)
    root = os.path.expanduser("~/.cache/lightning-autobalance/cifar10-jpeg")
    return LongTailImageFolder(root=root, image_size=None, cache_in_memory=True, imbalance_ratio=100,
                               batch_size=128, num_workers=0, val_source="none", search_split=True, seed=seed)


def summary(grads: list[dict[str, torch.Tensor]], full: dict[str, torch.Tensor]) -> dict[str, float]:
    ref = full["offset"].flatten().double()
    cos, spread = [], []
    for g in grads:
        v = g["offset"].flatten().double()
        cos.append(float(torch.nn.functional.cosine_similarity(v, ref, dim=0)))
        spread.append(float((v - ref).norm() / ref.norm()))
    tau_sign = sum(float(torch.sign(g["tau"])) == float(torch.sign(full["tau"])) for g in grads) / len(grads)
    taus = torch.tensor([float(g["tau"]) for g in grads], dtype=torch.float64)
    return {"cosine": sum(cos) / len(cos), "spread": sum(spread) / len(spread), "tau_sign": tau_sign,
            "tau_cv": float(taus.std() / taus.mean().abs())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["digits", "cifar10_jpeg"], default="cifar10_jpeg")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--draws", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    t0 = time.time()
    dm = datamodule(args.data, args.seed)
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(args.seed, verbose=False)
    network = "digits_net" if args.data == "digits" else "resnet32"
    sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4} if args.data == "digits" else \
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4}
    model = ImbalancedClassifier(network, num_classes=dm.num_classes, class_counts=dm.class_counts, preset="la",
                                 search=("offset",), optimizer=functools.partial(torch.optim.SGD, **sgd))
    pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, datamodule=dm)
    model.train()
    params = model.autobalance
    fmodel = FunctionalModel(model, lambda m, x: m.autobalance_forward(x))
    train = [Batch(*model.autobalance_unpack(next(iter(dm.train_dataloader()))))]
    upper_counts = dm.upper_class_counts
    loader = dm.upper_dataloader()

    def grad(objective: object, upper: list) -> dict[str, torch.Tensor]:
        batches = [Batch(*model.autobalance_unpack(b)) for b in upper]
        res = hypergradient(fmodel, params.alpha(), params.tables, model.autobalance_loss_from_tables, objective,
                            train, batches)
        return {k: v.detach() for k, v in res.grad.items()}

    uniform_obj = build_objective("balanced_ce", upper_counts)
    balanced_obj = build_objective("balanced_ce", [1] * len(upper_counts))
    whole = BatchStream(loader, seed=99, shuffle=False)
    full = grad(uniform_obj, [whole.next() for _ in range(whole.batches_per_pass())])
    uniform = BatchStream(loader, seed=1)
    balanced = BatchStream(loader, seed=1, labels=torch.as_tensor(dm.upper_targets))
    rows = {
        "uniform": summary([grad(uniform_obj, [uniform.next()]) for _ in range(args.draws)], full),
        "class-balanced": summary([grad(balanced_obj, [balanced.next()]) for _ in range(args.draws)], full),
    }
    print(f"# {args.data}, seed {args.seed}, {args.epochs} epochs on the lower split, upper counts {upper_counts}, "
          f"upper batch {loader.batch_size}, {whole.batches_per_pass()} upper batches a pass, {args.draws} draws")
    print("| upper batches | mean cosine to whole-split offset hypergradient | relative spread | tau sign agrees | "
          "tau coefficient of variation |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cosine']:.3f} | {r['spread']:.2f} | {r['tau_sign']:.2f} | {r['tau_cv']:.2f} |")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
