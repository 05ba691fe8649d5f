"""Datasets (registered by name), the federated data protocol and partitioners.

The registry (:mod:`.registry`, with the built-in ``shapes`` datasets) knows nothing of the readers; each reader
module registers its datasets into it when imported, and this package imports them all (CoOp $DATA layout,
FedBN domains, Fashion-MNIST/CIFAR arrays; loaded lazily), so any import of ``fedlit.data…`` sees every dataset.
"""

from . import arrays, coop, dg, fedbn, shift, shift_readers  # noqa: F401  (register their datasets)
from .registry import ClassificationData, ImageSplit, get_dataset, list_datasets, register_dataset
from .task import Task

__all__ = ["ClassificationData", "ImageSplit", "Task", "get_dataset", "list_datasets", "register_dataset"]
