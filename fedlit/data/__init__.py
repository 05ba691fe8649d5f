"""Datasets (registered by name), the federated data protocol and partitioners."""

from .registry import ClassificationData, ImageSplit, get_dataset, list_datasets, register_dataset

__all__ = ["ClassificationData", "ImageSplit", "get_dataset", "list_datasets", "register_dataset"]
