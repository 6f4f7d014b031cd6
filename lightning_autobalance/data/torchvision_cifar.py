"""torchvision's CIFAR readers with an optional md5 check (for small hand-made test data)."""

import contextlib
import pickle
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torchvision.datasets.cifar as _torchvision_cifar
from torchvision.datasets import CIFAR10, CIFAR100

#: what a CIFAR batch or meta file may name when unpickled: NumPy arrays and their dtypes, nothing that runs code
_ARRAY_CLASSES = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for n in ("_reconstruct", "scalar")}
_ARRAY_CLASSES |= {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"A CIFAR file read without its md5 check (check_integrity=False) names "
                                     f"{module}.{name}; CIFAR batch files hold only arrays, lists and strings, so it "
                                     "is refused unread.")


@contextlib.contextmanager
def _arrays_only() -> Iterator[None]:
    """torchvision's CIFAR reader with every ``pickle.load`` of its module restricted to arrays (fails closed when
    that module no longer reads through ``pickle``)."""
    if getattr(_torchvision_cifar, "pickle", None) is not pickle:
        raise RuntimeError("check_integrity=False needs torchvision's CIFAR reader to load through `pickle`, which "
                           "this torchvision version does not: use check_integrity=True.")
    safe = types.SimpleNamespace(load=lambda f, **kw: _ArraysOnly(f, **kw).load())
    _torchvision_cifar.pickle = safe  # type: ignore[assignment]
    try:
        yield
    finally:
        _torchvision_cifar.pickle = pickle

__all__ = ["CIFAR10Reader", "CIFAR100Reader"]


class _OptionalIntegrityMixin:
    """Lets torchvision's CIFAR reader skip its md5 checks when ``check_integrity=False``.

    torchvision checks every batch file and the meta file against fixed md5 sums, which rejects anything but the
    official release. With ``check_integrity=False`` the md5 sums in this instance's file tables are set to None, which
    torchvision's ``check_integrity`` treats as "the file exists"; the real torchvision code then parses the pickled
    files, through an unpickler that accepts arrays only (a crafted file in the data folder cannot run code).
    """

    def __init__(self, root: str | Path, train: bool = True, download: bool = False,
                 check_integrity: bool = True) -> None:
        if check_integrity:
            super().__init__(root, train=train, download=download)  # type: ignore[call-arg]
            return
        cls: Any = type(self)
        self.train_list = [[name, None] for name, _ in cls.train_list]
        self.test_list = [[name, None] for name, _ in cls.test_list]
        self.meta = {**cls.meta, "md5": None}
        with _arrays_only():
            super().__init__(root, train=train, download=download)  # type: ignore[call-arg]


class CIFAR10Reader(_OptionalIntegrityMixin, CIFAR10):
    """``torchvision.datasets.CIFAR10`` with an optional md5 check.

    Args:
        root: Folder that holds ``cifar-10-batches-py``.
        train: Training (True) or test (False) batches.
        download: Let torchvision download the release if it is missing.
        check_integrity: Check md5 sums (True) or only that the files exist (False).

    Example:
        >>> reader = CIFAR10Reader("data", train=False, check_integrity=False)  # doctest: +SKIP
        >>> reader.data.shape  # doctest: +SKIP
        (10000, 32, 32, 3)
    """


class CIFAR100Reader(_OptionalIntegrityMixin, CIFAR100):
    """``torchvision.datasets.CIFAR100`` with an optional md5 check (fine labels); the arguments of
    :class:`CIFAR10Reader`, ``root`` holding ``cifar-100-python``.

    Example:
        >>> reader = CIFAR100Reader("data", train=False, check_integrity=False)  # doctest: +SKIP
        >>> len(reader.classes)  # doctest: +SKIP
        100
    """
