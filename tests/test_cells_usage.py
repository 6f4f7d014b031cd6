"""The (group, class) cell index where the package's tables use it, and the mixin's logits-width message by where the
loss's class counts came from (given, or restored from a checkpoint)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import linear_module

from lightning_autobalance import AutoBalanceMixin, GroupDROLoss
from lightning_autobalance.core.cells import cell_index
from lightning_autobalance.core.metrics import GroupErrors
from lightning_autobalance.core.objectives import BalancedCrossEntropy

G, K, N = 3, 4, 200


def _samples(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, K, (N,), generator=gen), torch.randint(0, K, (N,), generator=gen),
            torch.randint(0, G, (N,), generator=gen))


def test_group_errors_counts_each_sample_in_its_group_row_and_class_column():
    """``GroupErrors`` (which indexes cells with ``cell_index``) against counts made one sample at a time."""
    preds, target, group = _samples()
    metric = GroupErrors(num_classes=K, num_groups=G)
    metric.update(preds, target, group)
    total = torch.zeros(G, K, dtype=torch.long)
    correct = torch.zeros(G, K, dtype=torch.long)
    for p, y, g in zip(preds.tolist(), target.tolist(), group.tolist()):
        total[g, y] += 1
        correct[g, y] += int(p == y)
    assert torch.equal(metric.total, total) and torch.equal(metric.correct, correct)
    assert int(total.sum()) == N


def test_cell_objective_and_group_dro_weigh_the_cell_of_each_sample():
    """The cell-balanced objective and group DRO over cells (both index cells with ``cell_index``) against a
    reference written with explicit ``(g, y)`` table lookups."""
    torch.manual_seed(0)
    _, target, group = _samples(1)
    logits = torch.randn(N, K, dtype=torch.float64)
    counts = torch.bincount(cell_index(group, target, K), minlength=G * K).view(G, K)
    losses = F.cross_entropy(logits, target, reduction="none")

    objective = BalancedCrossEntropy(counts.tolist(), over="cell", num_groups=G)
    per_cell = torch.zeros(G, K, dtype=torch.float64)
    for i in range(N):
        per_cell[group[i], target[i]] += losses[i] / counts[group[i], target[i]]
    present = counts > 0
    assert torch.allclose(objective(logits, target, group), per_cell[present].mean(), rtol=1e-12, atol=0.0)

    dro = GroupDROLoss(K, G, step_size=0.5, over="cell").double()
    dro(logits, target, group)  # one training step moves q towards the cells with the larger mean loss
    means = torch.zeros(G, K, dtype=torch.float64)
    for i in range(N):
        means[group[i], target[i]] += losses[i] / counts[group[i], target[i]]
    q = torch.full((G * K,), 1.0 / (G * K), dtype=torch.float64) * torch.exp(0.5 * means.reshape(-1))
    assert torch.allclose(dro.q.double(), q / q.sum(), rtol=1e-6, atol=0.0)


Linear = linear_module(AutoBalanceMixin, pl.LightningModule, in_features=5)


class NoCounts(AutoBalanceMixin, pl.LightningModule):
    """A module that never gives counts: its loss comes from a checkpoint (or would be found at setup)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.layer(x)


def test_the_logits_width_error_says_where_the_class_count_came_from():
    """Counts given to ``configure_autobalance``: the message names them. Counts restored from a checkpoint into a
    module that gave none: the message gives the loss's class count without claiming they were given."""
    given = Linear([30, 10])
    with pytest.raises(ValueError, match=r"configure_autobalance was given class_counts for 2 classes: "
                                         r"expected \(N, 2\)"):
        given.autobalance_loss(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))

    restored = NoCounts()
    restored.load_state_dict(given.state_dict())
    assert restored.autobalance.class_counts.tolist() == [[30.0, 10.0]]
    with pytest.raises(ValueError) as err:
        restored.autobalance_loss(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    assert "the loss has 2 classes: expected (N, 2). Pass one count per output of the model." in str(err.value)
    assert "configure_autobalance was given" not in str(err.value)
