"""The dataset base class and the file pairing every dataset is built on.

A dataset pairs image files with label PNGs once, at construction, and decodes one pair per
``load(i)``: image uint8 (H, W, 3) RGB, label int64 (H, W) of class ids 0..K-1 with 255 = ignore,
after the dataset's label mapping. ``__getitem__`` applies ``transform(image, label)`` and returns
``dict(image=FloatTensor (3, h, w), label=LongTensor (h, w), name=str)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .images import read_image
from .labels import read_label_ids
from .meta import IGNORE_INDEX
from .transforms import EvalTransform

PathLike = Union[str, Path]
Transform = Callable[[np.ndarray, np.ndarray], tuple]


@dataclass(frozen=True)
class Sample:
    """One image/label pair; ``name`` is the image's name without its suffix."""

    name: str
    image: Path
    label: Path


# ------------------------------------------------------------------------------------------- file helpers
def require_dir(path: Path, dataset: str, layout: str) -> Path:
    """``path`` if it is a folder, else an InputError naming it and the expected layout."""
    if not path.is_dir():
        raise InputError(f"{dataset}: folder {path} not found. Expected layout:\n{layout}")
    return path


def _strip_suffix(name: str, suffixes: Sequence[str]) -> Optional[str]:
    """``name`` without the first matching suffix (case-insensitive), or None if none matches."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix.lower()) and len(name) > len(suffix):
            return name[: len(name) - len(suffix)]
    return None


def pair_files(image_dir: Path, label_dir: Path, image_suffixes: Sequence[str], label_suffix: str, *,
               recursive: bool = False, names: Optional[Sequence[str]] = None,
               dataset: str = "dataset") -> list[Sample]:
    """Pair ``image_dir/<rel>/<base><image suffix>`` with ``label_dir/<rel>/<base><label_suffix>``.

    With ``names`` (an image-set list) only those bases are used, with the first image suffix.
    Raises InputError naming both files when an image has no label, and when nothing is found.
    """
    if names is not None:
        images = [image_dir / f"{n}{image_suffixes[0]}" for n in names]
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise InputError(f"{dataset}: {len(missing)} image(s) listed in the split file are missing, "
                             f"first: {missing[0]}")
    else:
        pattern = "**/*" if recursive else "*"
        images = sorted(p for p in image_dir.glob(pattern) if p.is_file()
                        and _strip_suffix(p.name, image_suffixes) is not None)
    samples = []
    for image in images:
        base = _strip_suffix(image.name, image_suffixes)
        assert base is not None
        rel = image.parent.relative_to(image_dir)
        label = label_dir / rel / f"{base}{label_suffix}"
        if not label.is_file():
            raise InputError(f"{dataset}: image {image} has no label file; expected {label}")
        samples.append(Sample(str(rel / base) if recursive else base, image, label))
    if not samples:
        raise InputError(f"{dataset}: no images ({'/'.join(image_suffixes)}) found in {image_dir}")
    return samples


# ------------------------------------------------------------------------------------------------ base class
class SegDataset(torch.utils.data.Dataset):
    """Image/label pairs with class names and palette.

    ``load(i) -> (uint8 (H, W, 3), int64 (H, W))`` after label mapping (reduce-zero-label: 0 -> 255, k -> k-1;
    then ``label_map``); ids >= num_classes other than 255 raise InputError naming the file.
    ``__getitem__(i) -> dict(image=(3, h, w) float, label=(h, w) long, name=str)``.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], palette: Sequence[Sequence[int]],
                 transform: Optional[Transform] = None, reduce_zero_label: bool = False,
                 label_map: Optional[dict[int, int]] = None, split: str = "") -> None:
        if len(classes) != len(palette):
            raise ConfigError(f"{len(classes)} class names but {len(palette)} palette colours")
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.palette = [tuple(int(v) for v in c) for c in palette]
        self.transform = transform if transform is not None else EvalTransform()
        self.reduce_zero_label = reduce_zero_label
        self.label_map = dict(label_map or {})
        self.split = split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: Path) -> np.ndarray:
        """Raw int64 (H, W) label as stored; subclasses decode other encodings."""
        return read_label_ids(path)

    def map_label(self, label: np.ndarray) -> np.ndarray:
        """Raw ids -> training ids (reduce-zero-label, then ``label_map``)."""
        if self.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        if self.label_map:
            out = label.copy()
            for src, dst in self.label_map.items():
                out[label == src] = dst
            label = out
        return label

    def check_label(self, label: np.ndarray, path: Path) -> None:
        """InputError naming ``path`` and the ids when any id is outside 0..K-1 and not 255."""
        bad = ((label >= self.num_classes) | (label < 0)) & (label != self.ignore_index)
        if bad.any():
            ids = np.unique(label[bad]).tolist()
            shown = ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "")
            raise InputError(f"label {path} has ids {shown} outside 0..{self.num_classes - 1} "
                             f"(after this dataset's label mapping); 255 is the only ignore id")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3) RGB, label int64 (H, W), 255 = ignore) of sample ``i``."""
        s = self.samples[i]
        image = read_image(s.image)
        label = self.map_label(self.read_label(s.label))
        if label.shape != image.shape[:2]:
            raise InputError(f"label {s.label} is {label.shape[1]}x{label.shape[0]} but image {s.image} is "
                             f"{image.shape[1]}x{image.shape[0]} (width x height)")
        self.check_label(label, s.label)
        return image, label

    def name(self, i: int) -> str:
        return self.samples[i].name

    def __getitem__(self, i: int) -> dict:
        image, label = self.load(i)
        image_t, label_t = self.transform(image, label)
        return {"image": image_t, "label": label_t, "name": self.name(i)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, {len(self)} images, {self.num_classes} classes)"
