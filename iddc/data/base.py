"""The one interface every data set implements: images with optional label maps."""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


class SegmentationSource(ABC):
    """A list of RGB images with optional label maps (uint8, IGNORE_INDEX = unlabelled).

    Subclasses fill ``num_classes`` and ``class_names`` and implement ``__len__``, ``load`` and
    ``name``. Augmentation (SPEC section 4) and normalisation live in ``iddc.data.transforms``,
    not here, so every source feeds training, evaluation and prediction the same way.
    """

    num_classes: int = 0
    class_names: Optional[Sequence[str]] = None
    has_labels: bool = True

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abstractmethod
    def load(self, index: int) -> tuple[Image.Image, Optional[np.ndarray]]:
        """(RGB PIL image, H x W uint8 label array or None)."""

    def name(self, index: int) -> str:
        """A short, file-system-safe identifier of the sample (its file stem)."""
        return f"{index:06d}"

    def files(self) -> list:
        """The files its samples are read from (images and label maps) and the others it was
        built from (a curated list, a class-names file): what an output must never replace
        (none for a source made in memory)."""
        return []


class InferredClassesWarning(UserWarning):
    """A doubt about the K a data set inferred from its label maps (given only where that K
    is the one used, not where a model's K is scored)."""


class ClassesNotInferredError(ValueError):
    """A data set that infers K from its label maps found no class id in the maps it reads:
    another split's K, or num_classes, must set it."""


class DataOptionError(ValueError):
    """A data-set option (``--data-option KEY=VALUE``, a YAML ``data.options`` entry) or the
    data root has a value the data set cannot take: the user's input, not the files, is wrong
    (``python -m iddc.data.layout`` exits 2 for it, 1 for bad files)."""


def int_option(value, name: str, minimum: int, maximum: Optional[int] = None,
               dataset: str = "data set") -> int:
    """`value` of the data-set option `name` as an int in minimum..maximum, else a
    DataOptionError naming the option. A bool or a float is refused: `subset=true` or
    `num_classes=2.5` is a slip, not a count."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    raise DataOptionError(f"{dataset}: option {name}={value!r} must be a whole number {bounds}")


def take_subset(items: list, subset, dataset: str) -> list:
    """The first `subset` items (the `subset=N` option of every file data set); None: all."""
    if subset is None:
        return items
    return items[:int_option(subset, "subset", 1, dataset=dataset)]
