"""Data sets (SPEC section 4): one registry from a name to a `SegmentationSource` factory."""
from __future__ import annotations

import importlib

from .base import IGNORE_INDEX, SegmentationSource

# name -> "module:factory"; a factory is called as factory(root=..., split=..., **options)
# and returns a SegmentationSource. Imported lazily so a missing optional piece never breaks
# the others.
DATASETS = {
    "synthetic": "iddc.data.synthetic:build",
    "cocostuff27": "iddc.data.cocostuff:build_cocostuff27",
    "cocostuff171": "iddc.data.cocostuff:build_cocostuff171",
    "cityscapes": "iddc.data.cityscapes:build",
    "folder": "iddc.data.folder:build",
}


def build_source(name: str, root=None, split: str = "train", **options) -> SegmentationSource:
    """The data set `name` (one of DATASETS) at `root` for `split` ("train" or "val")."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    module, factory = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), factory)(root=root, split=split, **options)


__all__ = ["DATASETS", "IGNORE_INDEX", "SegmentationSource", "build_source"]
