"""Datasets and transforms; imports nothing from alexnet/ or parallel/."""
from data.errors import DataError

__all__ = ["DataError"]
