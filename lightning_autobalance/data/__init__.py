"""Long-tailed data: profiles, seeded selection and splits (``profiles``, ``search_split``), and Lightning
datamodules."""

from lightning_autobalance.data.base import LongTailDataModule
from lightning_autobalance.data.cifar import LongTailCIFAR10, LongTailCIFAR100
from lightning_autobalance.data.colored_digits import ColoredDigits
from lightning_autobalance.data.digits import LongTailDigits
from lightning_autobalance.data.file_dataset import ImageFileDataset, decode_image
from lightning_autobalance.data.fold_in import FoldInSampler
from lightning_autobalance.data.folder import LongTailImageFolder
from lightning_autobalance.data.memory_dataset import InMemoryImageDataset
from lightning_autobalance.data.profiles import head_medium_tail, long_tail_counts, select_long_tail, split_per_class
from lightning_autobalance.data.search_split import LabelledSubset, SearchSplit, dataset_targets, search_split
from lightning_autobalance.data.tinted_dataset import TintedImageDataset

__all__ = ["ColoredDigits", "FoldInSampler", "ImageFileDataset", "InMemoryImageDataset", "LabelledSubset",
           "LongTailCIFAR10", "LongTailCIFAR100", "LongTailDataModule", "LongTailDigits", "LongTailImageFolder",
           "SearchSplit", "TintedImageDataset", "dataset_targets", "decode_image", "head_medium_tail",
           "long_tail_counts", "search_split", "select_long_tail", "split_per_class"]
