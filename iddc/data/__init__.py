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
    fn = getattr(importlib.import_module(module), factory)
    try:
        return fn(root=root, split=split, **options)
    except TypeError as err:
        # an option the factory (or the source it builds) does not take: name it, and where the
        # data set's options are documented, instead of a bare TypeError
        if "unexpected keyword" not in str(err) and "unknown option" not in str(err):
            raise
        raise ValueError(f"data set {name!r}: bad --data-option ({err}); its options are listed "
                         f"in {module}.{factory}'s docstring and docs/datasets.md") from err


__all__ = ["DATASETS", "IGNORE_INDEX", "SegmentationSource", "build_source"]
