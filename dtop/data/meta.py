"""Class names and display palettes of the supported datasets (as mmsegmentation defines them).

The tables live in ``datasets.json`` beside this file. ``dataset_meta(name)`` returns a
:class:`DatasetMeta`; ids index ``classes`` and ``palette`` after the dataset's label mapping
(reduce-zero-label, CamVid's 11 -> 255, ...). 255 is ignore. Pascal Context 59 uses the ADE20K colours
1..59, as mmsegmentation does; the synthetic scenes use Cityscapes colours.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

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
