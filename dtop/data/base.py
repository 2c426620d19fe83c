"""The dataset base class and the file pairing every dataset is built on.

A dataset pairs image files with label files once, at construction, and decodes one pair per
``load(i)``: image uint8 (H, W, 3) RGB, label int64 (H, W) of class ids 0..K-1 with ``ignore_index``
(255 unless the dataset is given another: ``data.ignore_index``) = ignore, after the dataset's label
mapping. ``__getitem__`` applies ``transform(image, label)`` and returns
``dict(image=FloatTensor (3, h, w), label=LongTensor (h, w), name=str)``.

Two pairings: :func:`pair_files` (the named datasets' fixed layouts: every image must have its label) and
:func:`pair_tree` (a folder dataset: every file under an image folder and a label folder, matched by
relative path and stem; what could not be paired is kept in a :class:`Pairing` with the reason).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .images import read_image
from .labels import read_label_ids
from .meta import IGNORE_INDEX
from .transforms import EvalTransform

PathLike = Union[str, Path]
Transform = Callable[[np.ndarray, np.ndarray], tuple]
# Label files a folder dataset pairs (lossless formats; .png preferred when several share a stem).
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm", ".pbm", ".webp")
IGNORE_KEY = "data.ignore_index"  # the config key that sets a dataset's ignore id


@dataclass(frozen=True)
class Sample:
    """One image/label pair; ``name`` is the image's path below its folder, without its suffix."""

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


# ------------------------------------------------------------------------------------ folder-tree pairing
@dataclass
class Pairing:
    """What :func:`pair_tree` found under one or more (image folder, label folder) pairs.

    ``samples``: the pairs; ``unpaired``: images without a label (``Sample.label`` = the file expected);
    ``skipped``: (path, reason) of the other files left out (labels without an image, files that are
    neither, a second image with the same stem); ``searched``: the folder pairs; ``notes``: folders left
    out and why."""

    samples: list[Sample] = field(default_factory=list)
    unpaired: list[Sample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    searched: list[tuple[Path, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: "Pairing") -> None:
        for name in ("samples", "unpaired", "skipped", "searched", "notes"):
            getattr(self, name).extend(getattr(other, name))

    def summary(self, root: Path, what: str) -> str:
        """One line: how many pairs from which folders, and every kind of file skipped with one example."""
        rel = lambda p: _rel(p, root)  # noqa: E731
        folders = ", ".join(f"{rel(i)} + {rel(lab)}" for i, lab in self.searched) or "none"
        parts = [f"{what}: paired {len(self.samples)} image(s) with labels in {folders}"]
        if self.unpaired:
            s = self.unpaired[0]
            parts.append(f"skipped {len(self.unpaired)} image(s) without a label (e.g. {rel(s.image)}: "
                         f"no {rel(s.label.with_suffix(''))}{{{','.join(LABEL_SUFFIXES[:3])},...}})")
        kinds: dict[str, list[Path]] = {}
        for path, reason in self.skipped:
            kinds.setdefault(reason, []).append(path)
        parts += [f"skipped {len(ps)} {reason} (e.g. {rel(ps[0])})" for reason, ps in kinds.items()]
        return "; ".join(parts + self.notes)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def tree_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively, following links once), hidden files and folders left out,
    sorted."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found)


def _keyed(folder: Path, suffixes: Sequence[str], what: str) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """{relative path without suffix: file} of the files under ``folder`` with one of ``suffixes`` (an
    earlier suffix wins a shared stem), and (file, reason) for the others."""
    keyed: dict[str, tuple[int, Path]] = {}
    other: list[tuple[Path, str]] = []
    for f in tree_files(folder) if folder.is_dir() else []:
        rank = next((i for i, s in enumerate(suffixes) if f.name.lower().endswith(s) and len(f.name) > len(s)), None)
        if rank is None:
            other.append((f, f"file(s) in the {what} folder that are no {what} ({'/'.join(suffixes[:4])}...)"))
            continue
        key = f.relative_to(folder).as_posix()[: -len(suffixes[rank])]
        if key in keyed:
            keep, drop = sorted([keyed[key], (rank, f)])
            keyed[key] = keep
            other.append((drop[1], f"{what}(s) sharing a stem with another (kept {keep[1].name})"))
        else:
            keyed[key] = (rank, f)
    return {k: p for k, (_, p) in sorted(keyed.items())}, other


def pair_tree(image_dir: Path, label_dir: Path, image_suffixes: Sequence[str],
              label_suffixes: Sequence[str] = LABEL_SUFFIXES, prefix: str = "") -> Pairing:
    """Pair every image under ``image_dir`` with the label file of the same relative path and stem under
    ``label_dir`` (``a/b.jpg`` with ``a/b.png``); sample names are ``prefix + "a/b"``. Nothing is raised:
    what does not pair is listed in the returned :class:`Pairing`."""
    images, other_images = _keyed(image_dir, tuple(s.lower() for s in image_suffixes), "image")
    labels, other_labels = _keyed(label_dir, tuple(s.lower() for s in label_suffixes), "label")
    out = Pairing(searched=[(image_dir, label_dir)], skipped=other_images + other_labels)
    for key, image in images.items():
        label = labels.get(key)
        if label is None:
            out.unpaired.append(Sample(prefix + key, image, label_dir / f"{key}{label_suffixes[0]}"))
        else:
            out.samples.append(Sample(prefix + key, image, label))
    out.skipped += [(lab, "label(s) without an image") for key, lab in labels.items() if key not in images]
    return out


def split_list_entries(path: Path) -> list[str]:
    """The entries of a split file (mmsegmentation's: one stem or relative path per line; blank lines and
    ``#`` comments left out; a UTF-8 byte-order mark and Windows line ends read), each as a forward-slash
    path without ``./``."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read split file {path}: {e}") from e
    entries = []
    for line in lines:
        entry = line.split("#", 1)[0].strip().replace("\\", "/")
        while entry.startswith("./"):
            entry = entry[2:]
        if entry:
            entries.append(entry)
    if not entries:
        raise InputError(f"split file {path} lists no images (one stem or relative path per line)")
    return entries


def _keys(s: Sample, root: Path) -> set[str]:
    """The ways a split file may name sample ``s``: its name, the part after each ``/``, and its path
    below ``root`` (or absolute) with or without the suffix."""
    parts = s.name.split("/")
    keys = {"/".join(parts[i:]) for i in range(len(parts))}
    for p in (_rel(s.image, root), str(s.image)):
        keys |= {p, p[: -len(s.image.suffix)] if s.image.suffix else p}
    return keys


def select_listed(pairing: Pairing, entries: Sequence[str], root: Path, list_path: Path,
                  image_suffixes: Sequence[str], dataset: str) -> Pairing:
    """The pairs ``entries`` name, in the list's order (an entry may carry an image suffix). InputError for
    an entry that names no image, or several."""
    index: dict[str, list[tuple[bool, Sample]]] = {}
    for paired, group in ((True, pairing.samples), (False, pairing.unpaired)):
        for s in group:
            for k in _keys(s, root):
                index.setdefault(k, []).append((paired, s))
    orphans = [(p, why) for p, why in pairing.skipped if why.startswith("label(s) without")]  # for the messages
    out = Pairing(searched=pairing.searched, notes=pairing.notes, skipped=orphans)
    missing, seen = [], set()
    for entry in entries:
        hits = index.get(entry) or index.get(_strip_suffix(entry, image_suffixes) or entry) or []
        if not hits:
            missing.append(entry)
        elif len({s.image for _, s in hits}) > 1:
            raise InputError(f"{dataset}: split file {list_path}: {entry!r} names {len(hits)} images "
                             f"({', '.join(_rel(s.image, root) for _, s in hits[:3])}); write its path below "
                             f"the images folder instead")
        elif hits[0][1].image not in seen:
            seen.add(hits[0][1].image)
            (out.samples if hits[0][0] else out.unpaired).append(hits[0][1])
    if missing:
        some = next(iter(pairing.samples + pairing.unpaired), None)
        raise InputError(f"{dataset}: split file {list_path}: {len(missing)} of {len(entries)} entries name no "
                         f"image under {root} (first: {missing[0]!r})"
                         + (f"; entries look like {some.name!r}" if some else ""))
    return out


# ------------------------------------------------------------------------------------------------ base class
def check_ignore_index(value: Any, num_classes: int, dataset: str = "dataset") -> int:
    """``value`` as the ignore id of a dataset of ``num_classes`` classes. ConfigError when it is not an
    integer, or is one of the class ids 0..K-1 (that class would be dropped from training and evaluation),
    naming both numbers and :data:`IGNORE_KEY`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{IGNORE_KEY} must be an integer, got {value!r}")
    k, value = int(num_classes), int(value)
    if 0 <= value < k:
        hint = 255 if k <= 255 else 65535 if k < 65535 else -1
        raise ConfigError(f"{dataset}: the ignore id {value} is one of the {k} class ids 0..{k - 1} "
                          f"(num_classes {k} > ignore id {value}): that class's pixels would be dropped from "
                          f"training and evaluation; set {IGNORE_KEY} to an id outside 0..{k - 1} (e.g. {hint}) "
                          f"that the label files use for 'ignore'")
    return value


class SegDataset(torch.utils.data.Dataset):
    """Image/label pairs with class names and palette (``palette[k]`` colours class k, ``classes[k]`` names
    it, for the ids ``load`` returns).

    ``load(i) -> (uint8 (H, W, 3), int64 (H, W))`` after label mapping (stored ``file_ignore_index`` ->
    ``ignore_index``; reduce-zero-label: 0 -> ignore, k -> k-1; then ``label_map``, where a target of 255
    means the ignore id); ids >= num_classes other than the ignore id raise InputError naming the file.
    ``__getitem__(i) -> dict(image=(3, h, w) float, label=(h, w) long, name=str)``.
    ConfigError when the ignore id is one of the class ids 0..K-1.
    """

    ignore_index: int = IGNORE_INDEX
    file_ignore_index: Optional[int] = IGNORE_INDEX  # the id that means "ignore" in the label files

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], palette: Sequence[Sequence[int]],
                 transform: Optional[Transform] = None, reduce_zero_label: bool = False,
                 label_map: Optional[dict[int, int]] = None, split: str = "",
                 ignore_index: int = IGNORE_INDEX) -> None:
        if len(classes) != len(palette):
            raise ConfigError(f"{len(classes)} class names but {len(palette)} palette colours")
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.palette = [tuple(int(v) for v in c) for c in palette]
        self.transform = transform if transform is not None else EvalTransform()
        self.reduce_zero_label = reduce_zero_label
        self.label_map = dict(label_map or {})
        self.split = split
        self.set_ignore_index(ignore_index)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_ignore_index(self, value: int) -> None:
        """Use ``value`` as the ignore id (also for the transform's padding, when it has ``ignore_index``).
        ConfigError when it is not an integer or is one of the class ids 0..K-1, naming both numbers and
        the key to change."""
        self.ignore_index = check_ignore_index(value, self.num_classes, type(self).__name__)
        if hasattr(self.transform, "ignore_index"):
            self.transform.ignore_index = value

    def meta_record(self) -> dict[str, Any]:
        """``{"classes", "palette", "ignore_index"}`` of the ids ``load`` returns (what training records in a
        checkpoint so that predictions are named and coloured as the model learnt them)."""
        return {"classes": list(self.classes), "palette": [list(c) for c in self.palette],
                "ignore_index": self.ignore_index}

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: Path) -> np.ndarray:
        """Raw int64 (H, W) label as stored; subclasses decode other encodings."""
        return read_label_ids(path)

    def map_label(self, label: np.ndarray) -> np.ndarray:
        """Raw ids -> training ids: stored ``file_ignore_index`` -> ``ignore_index``, reduce-zero-label,
        then ``label_map`` (a target of 255, ``IGNORE_INDEX``, means the ignore id)."""
        ign = self.ignore_index
        ignored = None if self.file_ignore_index is None else label == self.file_ignore_index
        if self.reduce_zero_label:
            label = np.where(label == 0, ign, label - 1)
        if self.label_map:
            out = label.copy()
            for src, dst in self.label_map.items():
                out[label == src] = ign if dst == IGNORE_INDEX else dst
            label = out
        if ignored is not None and ignored.any():
            label = np.where(ignored, ign, label)
        return label

    def check_label(self, label: np.ndarray, path: Path) -> None:
        """InputError naming ``path``, the ids, the number of classes and the ignore id (and the keys that
        set them) when any id is outside 0..K-1 and not the ignore id."""
        bad = ((label >= self.num_classes) | (label < 0)) & (label != self.ignore_index)
        if bad.any():
            ids = np.unique(label[bad]).tolist()
            shown = ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "")
            raise InputError(f"label {path} has ids {shown} outside 0..{self.num_classes - 1} "
                             f"({self.num_classes} classes, after this dataset's label mapping) that are not "
                             f"the ignore id {self.ignore_index}: give the dataset more classes, or set "
                             f"{IGNORE_KEY} to the id the files use for 'ignore'")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3) RGB, label int64 (H, W), ``ignore_index`` = ignore) of sample ``i``."""
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
