"""Running a block from a recorded random state.

The extra forward passes of a hyper step must see the same dropout masks as the training step's own pass on that
batch, and must leave the random state the training loop sees untouched. Plain torch; nothing knows about Lightning.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["RandomState", "from_state", "preserve_random_state"]

#: ``(torch.get_rng_state(), the CUDA state of the device or None)``
RandomState = tuple[Tensor, "Tensor | None"]


@contextlib.contextmanager
def from_state(state: RandomState | None, device: torch.device) -> Iterator[None]:
    """Runs the block from ``state`` (nothing changes when it is ``None``), restoring the surrounding state after.

    Example:
        >>> state = (torch.get_rng_state(), None)
        >>> a = torch.rand(2)
        >>> with from_state(state, torch.device("cpu")):
        ...     b = torch.rand(2)
        >>> bool((a == b).all()), bool((torch.rand(2) != b).any())
        (True, True)
    """
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None and devices:
            torch.cuda.set_rng_state(state[1], device)
        yield


@contextlib.contextmanager
def preserve_random_state(device: torch.device) -> Iterator[None]:
    """Restores torch (CPU and the current CUDA device), Python and NumPy random states after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)
