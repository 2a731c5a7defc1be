"""Data sets (SPEC section 4): one registry from a name to a `SegmentationSource` factory."""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Optional

from .base import (IGNORE_INDEX, ClassesNotInferredError, DataOptionError,
                   InferredClassesWarning, SegmentationSource)

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
        raise DataOptionError(f"data set {name!r}: bad --data-option ({err}); its options are "
                              f"listed in {module}.{factory}'s docstring and docs/datasets.md "
                              "(an option may also come from the config's data.options, "
                              "train_options or val_options, a resumed run's own included: "
                              "--set data.train_options={} clears those)") from err


#: options whose value is text: ``--data-option KEY=VALUE`` keeps it as typed, not read as YAML
#: (which would make label_root=2024 a number, ~ null, no false and "labs #2" "labs").
#: PATH_OPTIONS are paths relative to the current folder, made absolute in a run's config
#: (iddc.config), so that a later command run elsewhere reads the same files; TEXT_OPTIONS are
#: not (curated_list is a file name in the data root's curated/<split>2017/).
PATH_OPTIONS = ("label_root",)
TEXT_OPTIONS = ("curated_list", "image_ext")
#: a list in YAML syntax ([sky, road]) or else, kept as typed, a text file (relative to the
#: current folder, made absolute as PATH_OPTIONS are)
LIST_OR_PATH_OPTIONS = ("class_names",)


#: names the commands give every data set themselves, never an option: how to set each
RESERVED_OPTIONS = {
    "root": "the data set's folder is --data-root (data.data_root)",
    "split": "the split is chosen by the command: training reads train and val, "
             "iddc.evaluate the one --split names",
}

#: data sets that infer K from a split's own label maps when the options give none
INFERS_NUM_CLASSES = {"folder"}


def _module_of(filename: str) -> Optional[str]:
    """The name of the imported module whose source is ``filename`` (None: warn_explicit then
    names it after the file, which a -W filter of the module would not match)."""
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == filename:
            return module.__name__
    return None


def _probed(name: str, root, split: str, options: dict):
    """(source, warnings): the split as a data set that infers K builds it from its first
    label maps, or None where it cannot tell (a corrupt map, an id beyond 255: scoring leaves
    those out or warns); and the warnings of that build but those about its K
    (InferredClassesWarning: the model's K is the one scored)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            source = build_source(name, root=root, split=split, **options)
        except Exception:
            source = None
    return source, [w for w in caught if not issubclass(w.category, InferredClassesWarning)]


def build_source_for(name: str, model_classes: int, /, root=None, split: str = "val",
                     *, fixed: bool = False, **options) -> SegmentationSource:
    """The split of data set `name` scored by a model of `model_classes` classes (``options``
    are the data set's own, ``num_classes`` among them). A data set that infers K per split
    (folder: 1 + the largest id in the split's first label maps) gets the model's K when its
    maps happen to show fewer classes (else ids of the missing classes would become unlabelled
    and silently leave the scores); a split showing more classes than the model has, or a fixed
    K that differs, is a ValueError naming both.

    ``fixed``: the model's K cannot change (a trained checkpoint, iddc.evaluate): a data set
    that infers K is built with the model's K instead (a stray id or a corrupt map among its
    first maps would otherwise stop the evaluation); ids >= K are unlabelled, warned about when
    loaded, and first maps that show more classes than K are warned about once."""
    if model_classes > IGNORE_INDEX:  # rare: a labelled split's build with K is refused, and
        # the mismatch's hint would be to set num_classes to K: say what cannot be done
        probed, _ = _probed(name, root, split, {k: v for k, v in options.items()
                                                if k not in ("num_classes", "class_names")})
        if probed is not None and probed.has_labels:
            raise ValueError(f"data set {name!r}: the model has {model_classes} classes, more "
                             f"than label maps hold (ids 0..{IGNORE_INDEX - 1}, {IGNORE_INDEX} = "
                             f"unlabelled): it cannot be scored against labels; iddc.predict "
                             f"segments with it, or train a model of at most {IGNORE_INDEX} "
                             f"classes to score")
    infers = name in INFERS_NUM_CLASSES and options.get("num_classes") is None \
        and options.get("class_names") is None
    if fixed and infers:
        probed, given = _probed(name, root, split, options)
        k = None if probed is None else int(probed.num_classes)
        if k == model_classes:  # the usual case: built once, its listing's warnings given
            for w in given:  # under the module that gave it (what a -W filter names)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                       module=_module_of(w.filename))
            return probed
        if k is not None and k > model_classes:  # scored all the same, but said
            warnings.warn(f"data set {name!r}: the {split} split's first label maps hold class "
                          f"ids up to {k - 1}, the model has {model_classes} classes: ids "
                          f"from {model_classes} on are scored as unlabelled; is this the data "
                          "set the model was trained on?", stacklevel=2)
        return build_source(name, root=root, split=split,
                            **{**options, "num_classes": model_classes})
    try:
        source = build_source(name, root=root, split=split, **options)
    except ClassesNotInferredError:  # its first maps unlabelled: the training split's K
        if not infers:
            raise
        return build_source(name, root=root, split=split, **{**options,
                                                              "num_classes": model_classes})
    k = int(source.num_classes)
    if k == model_classes:
        return source
    if infers and k < model_classes:
        return build_source(name, root=root, split=split, **{**options,
                                                              "num_classes": model_classes})
    if infers:  # training: K is still the run's to choose
        hint = (f"; set the classes with --data-option num_classes={k} (or num_classes="
                f"{model_classes}: ids from {model_classes} on are then unlabelled)")
    elif name in INFERS_NUM_CLASSES and not fixed:  # training: its val options set one
        hint = (f" (set by its options); the val split takes the training split's classes: "
                f"give it num_classes={model_classes}, or none")
    elif name in INFERS_NUM_CLASSES:  # set by num_classes or class_names
        hint = (f" (set by its options); score it with the model's classes: --data-option "
                f"num_classes={model_classes}, or leave num_classes and class_names out (ids "
                f"from {model_classes} on are then unlabelled, warned about)")
    else:
        hint = ""
    raise ValueError(f"data set {name!r}: the {split} split has {k} classes, the model "
                     f"{model_classes}{' (inferred from its label maps)' if infers else ''}"
                     f"{hint}")


__all__ = ["DATASETS", "DataOptionError", "IGNORE_INDEX", "LIST_OR_PATH_OPTIONS", "PATH_OPTIONS",
           "TEXT_OPTIONS", "SegmentationSource", "build_source", "build_source_for"]
