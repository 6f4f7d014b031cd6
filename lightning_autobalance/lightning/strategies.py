"""The Lightning strategies the hypergradient cannot run under: the model sharded across processes (FSDP,
DeepSpeed, model parallel) or XLA. Every hypergradient pass needs the whole model on every process."""

from __future__ import annotations

__all__ = ["SHARDED_STRATEGIES"]


def _sharded_strategies() -> tuple[type, ...]:
    import importlib

    found: list[type] = []
    for package in ("pytorch_lightning.strategies", "lightning.pytorch.strategies"):
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy",
                     "SingleDeviceXLAStrategy"):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                found.append(cls)
    return tuple(found)


#: the strategy classes refused at setup, from ``pytorch_lightning`` and, when installed, the unified ``lightning``
#: package (separate classes)
SHARDED_STRATEGIES = _sharded_strategies()
