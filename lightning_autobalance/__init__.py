"""lightning-autobalance: learn the training loss for imbalanced data with PyTorch Lightning.

The public names:

* :class:`AutoBalanceMixin`: gives a LightningModule a learnable loss;
* :class:`AutoBalanceCallback`: searches it while the Trainer fits the model, from the values
  :class:`Schedule`, :class:`Estimator`, :class:`UpperObjective`, :class:`UpperData` and :class:`HyperOptimizer`;
* :class:`ImbalancedClassifier`: a ready LightningModule for long-tailed classification;
* :func:`run_pipeline` (``lightning_autobalance.pipeline``): search, retrain, compare, from Python or the CLI;
* :class:`AdjustedCrossEntropy`: the loss family as a plain ``torch.nn.Module``;
* :func:`hypergradient`: the functional core, independent of Lightning.
"""

from lightning_autobalance.callback import AutoBalanceCallback
from lightning_autobalance.classifier import ImbalancedClassifier
from lightning_autobalance.estimator import Estimator
from lightning_autobalance.hyper_optimizer import HyperOptimizer
from lightning_autobalance.hypergradient import Batch, hypergradient
from lightning_autobalance.losses import (
    AdjustedCrossEntropy,
    FocalLoss,
    GroupDROLoss,
    LDAMLoss,
    LossTables,
    adjusted_cross_entropy,
    preset_tables,
)
from lightning_autobalance.mixin import AutoBalanceMixin
from lightning_autobalance.objectives import (
    BalancedCrossEntropy,
    BlendedObjective,
    EqualOpportunityGap,
    UpperObjective,
    WorstGroupLoss,
)
from lightning_autobalance.parametrization import (
    DatasetDependent,
    FrequencyGroups,
    Hierarchical,
    LossParametrization,
    PerClass,
    build_parametrization,
)
from lightning_autobalance.reduce import Reducer
from lightning_autobalance.schedule import Schedule
from lightning_autobalance.upper_data import UpperData

__version__ = "0.1.0.dev0"

__all__ = [
    "AdjustedCrossEntropy",
    "AutoBalanceCallback",
    "AutoBalanceMixin",
    "BalancedCrossEntropy",
    "Batch",
    "BlendedObjective",
    "DatasetDependent",
    "EqualOpportunityGap",
    "Estimator",
    "FocalLoss",
    "FrequencyGroups",
    "GroupDROLoss",
    "Hierarchical",
    "HyperOptimizer",
    "ImbalancedClassifier",
    "LDAMLoss",
    "LossParametrization",
    "LossTables",
    "PerClass",
    "Reducer",
    "Schedule",
    "UpperData",
    "UpperObjective",
    "WorstGroupLoss",
    "adjusted_cross_entropy",
    "build_parametrization",
    "hypergradient",
    "preset_tables",
]
