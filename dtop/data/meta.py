"""Class names and display palettes of the supported datasets (as mmsegmentation defines them).

The tables live in ``datasets.json`` beside this file. ``dataset_meta(name)`` returns a
:class:`DatasetMeta`; ids index ``classes`` and ``palette`` after the dataset's label mapping
(reduce-zero-label, CamVid's 11 -> 255, ...). 255 is ignore (``data.ignore_index`` sets another). Pascal
Context 59 uses the ADE20K colours 1..59, as mmsegmentation does; the synthetic scenes use Cityscapes colours.
``folder_classes`` gives a folder dataset's names and colours from its options; ``trained_display_meta`` those
of a trained model (``dtop predict``, figures).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import ConfigError, unknown_name

IGNORE_INDEX = 255
_TABLES = Path(__file__).with_name("datasets.json")


@dataclass(frozen=True)
class DatasetMeta:
    """Class names and one RGB colour per class, same length."""

    classes: tuple[str, ...]
    palette: list[tuple[int, int, int]]

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.palette):
            raise ConfigError(f"{len(self.classes)} class names but {len(self.palette)} palette colours")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@lru_cache(maxsize=None)
def _known() -> dict[str, DatasetMeta]:
    tables = json.loads(_TABLES.read_text())
    return {name: DatasetMeta(tuple(t["classes"]), [tuple(int(v) for v in c) for c in t["palette"]])
            for name, t in tables.items()}


def dataset_meta(name: str) -> DatasetMeta:
    """Class names and palette of a named dataset (``"ade20k"``, ``"camvid"``, ...); ConfigError otherwise."""
    key = name.lower().replace("-", "_")
    if key not in _known():
        raise unknown_name("dataset", name, sorted(_known()))
    return _known()[key]


def default_palette(num_classes: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Distinct-looking deterministic colours for datasets without a palette of their own."""
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes)]  # type: ignore[misc]


def display_meta(name: Optional[str], num_classes: int) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Colours and class names to show ``num_classes`` classes with: the named dataset's when it is known and
    has that many, else :func:`default_palette` and the class ids as names."""
    if name:
        try:
            meta = dataset_meta(name)
        except ConfigError:
            meta = None
        if meta is not None and len(meta.palette) >= num_classes:
            return list(meta.palette[:num_classes]), list(meta.classes[:num_classes])
    return default_palette(num_classes), [str(k) for k in range(num_classes)]


def named_display_meta(name: str, num_classes: int) -> tuple[list[tuple[int, int, int]], list[str], Optional[str]]:
    """Colours and class names of the named dataset ``name`` for a model of ``num_classes`` outputs (its
    first ``num_classes``), and a note when the dataset has more classes than that (else None): what a
    user's explicit choice (``dtop predict --palette``) gives. ConfigError for an unknown name (with the
    known ones) and for a dataset with fewer classes than the model (naming both counts)."""
    meta = dataset_meta(name)
    if meta.num_classes < num_classes:
        raise ConfigError(f"palette {name!r} has {meta.num_classes} classes but the model predicts {num_classes}; "
                          f"choose a dataset with at least {num_classes} classes, or leave the palette out to use "
                          f"the colours the model was trained with")
    note = None if meta.num_classes == num_classes else (
        f"palette {name!r} has {meta.num_classes} classes, the model {num_classes}: its first {num_classes} "
        f"colours and names are used")
    return list(meta.palette[:num_classes]), list(meta.classes[:num_classes]), note


def _colours(palette: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """``palette`` as (r, g, b) tuples of 0..255; ConfigError naming the first bad entry."""
    out = []
    for i, c in enumerate(palette):
        ok = isinstance(c, (list, tuple)) and len(c) == 3 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
        if not ok:
            raise ConfigError(f"palette[{i}] must be [r, g, b] with integers 0..255, got {c!r}")
        out.append((int(c[0]), int(c[1]), int(c[2])))
    return out


def folder_classes(palette: Optional[Sequence[Sequence[int]]] = None, reduce_zero_label: bool = False,
                   num_classes: Optional[int] = None, classes: Optional[Sequence[str]] = None
                   ) -> tuple[tuple[str, ...], list[tuple[int, int, int]]]:
    """Class names and colours of the K ids a folder dataset trains on (0..K-1), from its options.

    ``palette`` lists the colours of the ids AS STORED in the label files, id 0's first; with
    ``reduce_zero_label`` (stored 0 -> ignore, k -> k-1) its first entry is dropped, so ``palette[1:]``
    colours the K classes, in both label modes. ``classes`` names the K classes; with reduce_zero_label and
    a palette it may instead name every palette entry (its first name is then dropped too). ``num_classes``
    is K. Without a palette the colours are :func:`default_palette`, without names ``class_<k>``.
    ConfigError when the options disagree on K (naming each count and the rule) or give none.
    """
    drop = 1 if reduce_zero_label and palette is not None else 0
    if drop and len(palette) < 2:
        raise ConfigError("reduce_zero_label drops the palette's first colour (stored id 0 is ignored): the "
                          "palette needs id 0's colour and at least one class colour")
    colours = None if palette is None else _colours(palette)[drop:]
    names = None if classes is None else [str(c) for c in classes]
    if names is not None and drop and len(names) == len(palette):
        names = names[1:]
    counts = {key: n for key, n in (("classes", None if names is None else len(names)),
                                    ("palette", None if colours is None else len(colours)),
                                    ("num_classes", num_classes)) if n is not None}
    if not counts:
        raise ConfigError("a folder dataset needs classes=[...], num_classes=K or palette=[...]")
    if len(set(counts.values())) > 1:
        told = ", ".join(f"{key} gives {n}" for key, n in counts.items())
        rule = (f" (with reduce_zero_label the palette lists the stored ids 0..K, id 0's colour first, and that "
                f"first colour is dropped: {len(palette)} colours give {len(palette) - 1} classes)") if drop else ""
        raise ConfigError(f"folder dataset: the options disagree on the number of classes: {told}{rule}; "
                          "make them agree")
    k = next(iter(counts.values()))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"a folder dataset needs at least one class, got {k!r}")
    return (tuple(names) if names is not None else tuple(f"class_{i}" for i in range(k)),
            colours if colours is not None else default_palette(int(k)))


def trained_display_meta(data: Mapping[str, Any], num_classes: int, recorded: Optional[Mapping[str, Any]] = None
                         ) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Colours and class names of a model's ``num_classes`` outputs, as it was trained: ``recorded`` (a
    checkpoint's ``"dataset"`` entry, :meth:`SegDataset.meta_record`) when it has that many classes; else a
    folder dataset's own ``palette`` / ``classes`` options in ``data`` (a config's data section as a dict,
    :func:`folder_classes`); else :func:`display_meta` of ``data["name"]`` (checkpoints from before the
    record)."""
    if recorded and len(recorded.get("palette") or []) == num_classes == len(recorded.get("classes") or []):
        return _colours(recorded["palette"]), [str(c) for c in recorded["classes"]]
    name = str(data.get("name") or "")
    options = data.get("options") or {}
    if name.lower() == "folder" and isinstance(options, Mapping):
        try:
            names, colours = folder_classes(options.get("palette"), bool(options.get("reduce_zero_label")),
                                            options.get("num_classes"), options.get("classes"))
        except (ConfigError, TypeError):
            names, colours = (), []
        if len(colours) == num_classes:
            return colours, list(names)
    return display_meta(name or None, num_classes)
