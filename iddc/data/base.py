"""The one interface every data set implements: images with optional label maps."""
from __future__ import annotations

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
