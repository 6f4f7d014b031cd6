"""Multi-process checks run by tests/test_ddp.py in a subprocess (2 CPU processes, gloo).

Usage: python tests/_ddp_script.py MODE OUT_JSON [options]

Modes:
  hypergrad            hypergradient of 2 ranks (torch.distributed, each on its half) vs one process on the union,
                       for every method and for the per-unit objectives (built with one Reducer); group
                       DRO's q and averaged gradient against one process on the union
  fit                  Trainer(strategy=..., devices=2) with AutoBalanceCallback; loss parameters of every rank
  resume               fit to --epochs with checkpoints (--ckpt-dir), or resume from --resume to --epochs
  bad_batch            ranks with different upper batch sizes: must raise on every rank, not hang
  no_upper             one rank without upper data: must raise on every rank, not hang
  curriculum           Trainer(strategy=ddp, devices=2) with AugmentCurriculum: its levels and strengths of every
                       rank, and the per-class counts of an epoch summed over the ranks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_autobalance import AugmentCurriculum, AutoBalanceCallback, AutoBalanceMixin
from lightning_autobalance.core.hypergradient import Batch, hypergradient
from lightning_autobalance.core.losses import GroupDROLoss, adjusted_cross_entropy, unit_mean_losses
from lightning_autobalance.core.objectives import UpperObjective, build_objective
from lightning_autobalance.core.parametrization import PerClass
from lightning_autobalance.core.reduce import Reducer
from lightning_autobalance.lightning.batch_stream import ShardSampler

warnings.filterwarnings("ignore")
COUNTS = [60, 24, 8]


def blobs(counts, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    centres = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    x = centres[y] + torch.randn(len(y), 2, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm].to(dtype), y[perm]


# ---------------------------------------------------------------------------------------------------------------
def _hypergrad_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    param = PerClass(COUNTS, preset="la", search=("delta", "offset", "weight")).double()
    with torch.no_grad():
        for t in param.alpha().values():
            t.normal_(0, 0.2)
    x, y = blobs([16, 16, 16], seed=1, dtype=torch.float64)
    xu, yu = blobs([8, 8, 8], seed=2, dtype=torch.float64)
    half, halfu = len(y) // world, len(yu) // world
    mine = Batch(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    mine_u = Batch(xu[rank * halfu:(rank + 1) * halfu], yu[rank * halfu:(rank + 1) * halfu])
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def train_loss(f, t, g, tables):
        return adjusted_cross_entropy(f, t, *tables, group=g, validate=False)

    def objective(f, t, g):
        return (w[t] * F.cross_entropy(f, t, reduction="none")).mean()

    def all_reduce_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    def reduce(t):
        return all_reduce_sum(t) / world

    methods = {
        "neumann0_difference": {"product": "difference"},
        "neumann0_jvp": {"product": "jvp"},
        "neumann3_gauss_newton": {"terms": 3, "eta": 0.3, "product": "jvp"},
        "neumann2_hessian": {"terms": 2, "eta": 0.3, "curvature": "hessian", "product": "jvp"},
        "cg_gauss_newton": {"method": "cg", "cg_iterations": 4, "damping": 0.1, "product": "jvp"},
        "unroll": {"method": "unroll", "eta": 0.5, "product": "jvp"},
        "unroll_difference": {"method": "unroll", "eta": 0.5, "product": "difference"},
        "head": {"method": "head", "weight_decay": 0.05, "head_memory": 0, "head_steps": 40, "damping": 0.01},
    }
    report = {}
    for name, cfg in methods.items():
        multi = hypergradient(net, param.alpha(), param.tables, train_loss, objective, [mine], [mine_u],
                              reduce=reduce, **cfg)
        single = hypergradient(net, param.alpha(), param.tables, train_loss, objective, [Batch(x, y)],
                               [Batch(xu, yu)], **cfg)
        a = torch.cat([v.flatten() for v in multi.grad.values()])
        b = torch.cat([v.flatten() for v in single.grad.values()])
        gathered = [torch.zeros_like(a) for _ in range(world)]
        dist.all_gather(gathered, a)
        report[name] = {"rel_diff": float((a - b).norm() / b.norm()), "norm": float(b.norm()),
                        "ranks_identical": all(torch.equal(gathered[0], t) for t in gathered),
                        "objective_diff": float(abs(multi.objective - single.objective))}
    # The nonlinear (per-unit) objectives, exact across processes with a Reducer. Upper data with two
    # groups; groups and counts chosen so that every (label, group) cell occurs in the union.
    gu = torch.arange(len(yu)) % 2
    cells = torch.zeros(2, 3, dtype=torch.long).index_put_((gu, yu), torch.ones(len(yu), dtype=torch.long),
                                                           accumulate=True)
    mine_g = Batch(mine_u.inputs, mine_u.target, gu[rank * halfu:(rank + 1) * halfu])
    settings = {
        "worst_class_lse": ("worst_class", {}),
        "worst_cell_cvar": ("worst_group", {"mode": "cvar", "fraction": 0.3}),
        "deo": ("deo", {}),
        "blend": ("blend", {"lam": 0.5, "accuracy": "worst_group", "fairness": "deo"}),
    }
    reducer = Reducer(world, sum=all_reduce_sum)  # the one reducer: the hypergradient's mean and the objectives' sums
    for name, (objective_name, kwargs) in settings.items():
        upper_objective = build_objective(objective_name, cells.tolist(), **kwargs)
        across = UpperObjective(objective_name, **kwargs).build(cells.tolist(), reducer, validate=False)
        multi = hypergradient(net, param.alpha(), param.tables, train_loss, across, [mine], [mine_g],
                              reduce=reducer, product="jvp")
        single = hypergradient(net, param.alpha(), param.tables, train_loss, upper_objective, [Batch(x, y)],
                               [Batch(xu, yu, gu)], product="jvp")
        a = torch.cat([v.flatten() for v in multi.grad.values()])
        b = torch.cat([v.flatten() for v in single.grad.values()])
        gathered = [torch.zeros_like(a) for _ in range(world)]
        dist.all_gather(gathered, a)
        report["objective_" + name] = {
            "rel_diff": float((a - b).norm() / b.norm()), "norm": float(b.norm()),
            "ranks_identical": all(torch.equal(gathered[0], t) for t in gathered),
            "objective_diff": float(abs(multi.objective - single.objective))}
    # Group DRO as a training loss: q and DDP's averaged gradient of two processes equal one process on the union.
    criterion, q_ref = GroupDROLoss(3, 2, step_size=0.5), torch.full((6,), 1.0 / 6)
    q_diff, grad_diff = 0.0, 0.0
    for _ in range(3):
        params = list(net.parameters())
        grads = torch.autograd.grad(criterion(net(mine_g.inputs), mine_g.target, mine_g.group), params)
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat = flat / world
        means, _ = unit_mean_losses(F.cross_entropy(net(xu), yu, reduction="none"), gu * 3 + yu, 6)
        q = q_ref.double() * torch.exp(0.5 * means.detach().double())
        q_ref = (q / q.sum()).float()
        ref = torch.cat([g.flatten() for g in torch.autograd.grad((q_ref.to(means) * means).sum(), params)])
        q_diff = max(q_diff, float((criterion.q - q_ref).abs().max()))
        grad_diff = max(grad_diff, float((flat - ref).norm() / ref.norm()))
        with torch.no_grad():
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p -= 0.5 * g.view_as(p)
    gathered_q = [torch.zeros_like(criterion.q) for _ in range(world)]
    dist.all_gather(gathered_q, criterion.q)
    report["group_dro"] = {"q_diff": q_diff, "grad_rel_diff": grad_diff, "q_moved": float((q_ref - 1 / 6).abs().max()),
                           "q_identical": all(torch.equal(gathered_q[0], t) for t in gathered_q)}
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(report, fh)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
class Net(AutoBalanceMixin, pl.LightningModule):
    def __init__(self, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.weight_decay = weight_decay
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
        self.configure_autobalance(COUNTS, preset="ce", search=("offset", "weight"))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=self.weight_decay)


class RankReport(Callback):
    """Gathers the loss parameters of every rank at the end of the fit; rank 0 writes them."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([t.flatten() for t in pl_module.autobalance.alpha().values()])
        every = trainer.strategy.all_gather(flat).reshape(trainer.world_size, -1)
        ab = next(c for c in trainer.callbacks if isinstance(c, AutoBalanceCallback))
        if trainer.is_global_zero:
            with open(self.out, "w") as fh:
                json.dump({"alpha": every.tolist(), "hyper_steps": ab.hyper_steps, "world_size": trainer.world_size,
                           "global_step": trainer.global_step}, fh)


class CurriculumNet(Net):
    """LA fixed, a per-class noise augmentation driven by AugmentCurriculum (no search)."""

    def __init__(self) -> None:
        super().__init__()
        self.configure_autobalance(COUNTS, preset="la", search=("augment",), freeze=True)
        self.configure_augment({"ops": "noise"}, parametrization="class", seed=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.autobalance_loss(self(self.autobalance_augment(x, y)), y)


class CurriculumReport(Callback):
    """Listed before the curriculum: the epoch's per-class counts summed over the ranks (before the curriculum
    clears them); at the end, every rank's levels and strengths (rank 0 writes them)."""

    def __init__(self, out: str, curriculum: AugmentCurriculum) -> None:
        self.out, self.curriculum, self.totals = out, curriculum, []

    def on_train_epoch_end(self, trainer, pl_module):
        total = self.curriculum._total
        self.totals.append(trainer.strategy.reduce(total.double(), reduce_op="sum").round().long().tolist())

    def on_train_end(self, trainer, pl_module):
        levels = trainer.strategy.all_gather(self.curriculum.levels.to(pl_module.device))
        levels = levels.reshape(trainer.world_size, -1)
        noise = pl_module.autobalance_augmentation.strengths()["noise"].reshape(-1)
        every = trainer.strategy.all_gather(noise).reshape(trainer.world_size, -1)
        if trainer.is_global_zero:
            with open(self.out, "w") as fh:
                json.dump({"levels": levels.tolist(), "noise": every.tolist(), "totals": self.totals,
                           "world_size": trainer.world_size}, fh)


def curriculum_fit(args) -> None:
    pl.seed_everything(0, verbose=False)
    curriculum = AugmentCurriculum(threshold=0.6, max_level=4)
    trainer = make_trainer(args, [CurriculumReport(args.out, curriculum), curriculum, GroupTeardown()])
    trainer.fit(CurriculumNet(), train_loader())


class UpperPerRank(Dataset):
    """Upper data whose size depends on the rank (to make a rank without upper data)."""

    def __init__(self, empty_on_rank: int) -> None:
        self.x, self.y = blobs([10, 10, 10], seed=3)
        self.empty = int(os.environ.get("LOCAL_RANK", "0")) == empty_on_rank

    def __len__(self):
        return 0 if self.empty else len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class StopAfter(Callback):
    """Ends the fit after ``epochs`` epochs while the Trainer (and so the callback's schedule) plans for more."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class GroupTeardown(Callback):
    """Destroys the gloo process group at the end of the fit, in every process (the spawned ones included).

    Leaving gloo to the interpreter's exit sometimes aborts a process ("terminate called without an active
    exception", SIGABRT) after a fit that succeeded; with ``ddp_spawn`` the workers exit inside Lightning's launcher,
    past the reach of ``main``. Listed last, so that every other callback's collectives have run.
    """

    def teardown(self, trainer, pl_module, stage):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def train_loader():
    x, y = blobs(COUNTS, seed=4)
    # an order that depends on the epoch only, so that resumed and uninterrupted runs see the same batches
    return DataLoader(TensorDataset(x, y), batch_size=12, sampler=ShardSampler(len(y), seed=7))


def make_trainer(args, callbacks, devices=None):
    return pl.Trainer(accelerator="cpu", devices=devices or args.devices, strategy=args.strategy,
                      max_epochs=args.epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      callbacks=callbacks, num_sanity_val_steps=0, use_distributed_sampler=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("out")
    parser.add_argument("--strategy", default="ddp_spawn")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many epochs of a run configured for --epochs (an interruption)")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--objective", default="balanced_ce")
    parser.add_argument("--method", default="neumann", help="the estimator's method ('head': weight decay 1e-3)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.mode == "hypergrad":
        mp.spawn(_hypergrad_worker, args=(2, args.port, args.out), nprocs=2, join=True)
        return

    pl.seed_everything(0, verbose=False)
    xu, yu = blobs([10, 10, 10], seed=3)
    upper = DataLoader(TensorDataset(xu, yu), batch_size=6)
    common = {"every_n_steps": 1, "start_step": 0, "train_batches": 2, "hyper_lr": 0.05, "objective": args.objective,
              "estimator": {"method": args.method, "head_steps": 3, "head_memory": 64},
              "fit_tolerance": None}  # these tiny fits never fit their data: the heads decide, the loss stays searched
    if args.mode == "curriculum":
        curriculum_fit(args)
        return
    if args.mode == "bad_batch":
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        upper = DataLoader(TensorDataset(xu, yu), batch_size=6 if rank == 0 else 5)
    if args.mode == "no_upper":
        upper = DataLoader(UpperPerRank(empty_on_rank=1), batch_size=6)
    callbacks = [AutoBalanceCallback(upper_dataloader=upper, **common), RankReport(args.out)]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, every_n_epochs=1, save_last=True))
    if args.stop_after:
        callbacks.append(StopAfter(args.stop_after))
    callbacks.append(GroupTeardown())
    trainer = make_trainer(args, callbacks)
    trainer.fit(Net(weight_decay=1e-3 if args.method == "head" else 0.0), train_loader(), ckpt_path=args.resume)


if __name__ == "__main__":
    sys.exit(main())
