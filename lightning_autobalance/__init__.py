"""lightning-autobalance: learn the training loss for imbalanced data with PyTorch Lightning.

The public names:

* :class:`AutoBalanceMixin`: gives a LightningModule a learnable loss;
* :class:`AutoBalanceCallback`: searches it while the Trainer fits the model, from the values
  :class:`Schedule`, :class:`Estimator`, :class:`UpperObjective`, :class:`UpperData` and :class:`HyperOptimizer`;
* :func:`find_loss`: the search on a copy of a module, the decided loss set on it frozen, before its own fit;
* :class:`ImbalancedClassifier`: a ready LightningModule for long-tailed classification;
* :class:`AugmentCurriculum`: a per-class curriculum of augmentation strength (after CUDA), a baseline beside the
  searched augmentation;
* :func:`run_pipeline` (``lightning_autobalance.runner.pipeline``): search, retrain, compare, from Python or the CLI;
* :class:`AdjustedCrossEntropy`: the loss family as a plain ``torch.nn.Module``;
* :func:`hypergradient`: the functional core, independent of Lightning.

The package has three layers, one folder each: ``core`` (plain torch: losses, parametrisations, objectives, the
hypergradient and its solvers, the head's equilibrium), ``lightning`` (the mixin, the callback and what it drives,
the held-back check, the ready classifier) and ``runner`` (the pipeline, its fingerprints and lock, the CLI);
``data`` and ``models`` beside them.
"""

import importlib
import sys

from lightning_autobalance.core.estimator import Estimator
from lightning_autobalance.core.hypergradient import Batch, hypergradient
from lightning_autobalance.core.losses import (
    AdjustedCrossEntropy,
    FocalLoss,
    GroupDROLoss,
    LDAMLoss,
    LossTables,
    adjusted_cross_entropy,
    preset_tables,
)
from lightning_autobalance.core.objectives import (
    BalancedCrossEntropy,
    BlendedObjective,
    EqualOpportunityGap,
    UpperObjective,
    WorstGroupLoss,
)
from lightning_autobalance.core.parametrization import (
    DatasetDependent,
    FrequencyGroups,
    Hierarchical,
    LossParametrization,
    PerClass,
    build_parametrization,
)
from lightning_autobalance.core.reduce import Reducer
from lightning_autobalance.lightning.callback import AutoBalanceCallback
from lightning_autobalance.lightning.classifier import ImbalancedClassifier
from lightning_autobalance.lightning.curriculum import AugmentCurriculum
from lightning_autobalance.lightning.find_loss import FoundLoss, find_loss
from lightning_autobalance.lightning.hyper_optimizer import HyperOptimizer
from lightning_autobalance.lightning.mixin import AutoBalanceMixin
from lightning_autobalance.lightning.schedule import Schedule
from lightning_autobalance.lightning.upper_data import UpperData

__version__ = "0.1.0.dev0"

# Before the layers had folders, every module sat at the top of the package. The old paths still import, so that
# configs, checkpoints and code written against them keep working: ``lightning_autobalance.callback`` is
# ``lightning_autobalance.lightning.callback``, and so on.
_MOVED = {"guard": "lightning.check", **{name: f"{layer}.{name}" for layer, names in (
    ("core", "cells coerce estimator head hypergradient losses lr_schedule metrics objectives parametrization "
             "random_state reduce"),
    ("lightning", "batch_stream callback classifier flat_settings hyper_optimizer mixin schedule step_log "
                  "strategies upper_data"),
    ("runner", "cli fingerprint output_lock pipeline")) for name in names.split()}}
for _old, _new in _MOVED.items():
    _module = sys.modules.setdefault(f"{__name__}.{_old}", importlib.import_module(f"{__name__}.{_new}"))
    globals().setdefault(_old, _module)  # as an imported submodule would be; the function hypergradient stays
del _old, _new, _module

__all__ = ["AdjustedCrossEntropy", "AugmentCurriculum", "AutoBalanceCallback", "AutoBalanceMixin",
           "BalancedCrossEntropy", "Batch", "BlendedObjective", "DatasetDependent", "EqualOpportunityGap", "Estimator",
           "FocalLoss", "FoundLoss", "FrequencyGroups", "GroupDROLoss", "Hierarchical", "HyperOptimizer",
           "ImbalancedClassifier", "LDAMLoss", "LossParametrization", "LossTables", "PerClass", "Reducer", "Schedule",
           "UpperData", "UpperObjective", "WorstGroupLoss", "adjusted_cross_entropy", "build_parametrization",
           "find_loss", "hypergradient", "preset_tables"]
