"""Datasets, transforms, image and label readers, and class metadata for semantic segmentation.

    ds = build_dataset("camvid", "train", root="data/camvid", transform=TrainTransform((240, 320), scale=None))
    item = ds[0]  # dict(image=FloatTensor (3, h, w), label=LongTensor (h, w), name=str)
"""
from .base import Sample, SegDataset, pair_files
from .datasets import ADE20K, CamVid, Cityscapes, COCOStuff10K, FolderDataset, PascalContext59
from .images import IMAGE_SUFFIXES, image_files, read_image
from .labels import read_label_ids, read_label_rgb
from .meta import IGNORE_INDEX, DatasetMeta, dataset_meta, default_palette, display_meta
from .registry import DATASETS, build_dataset
from .synthetic import SyntheticScenes, render_scene
from .transforms import EvalTransform, PhotoMetricDistortion, TrainTransform, denormalize, normalize

__all__ = [
    "SegDataset", "ADE20K", "PascalContext59", "COCOStuff10K", "Cityscapes", "CamVid", "FolderDataset",
    "SyntheticScenes", "DATASETS", "build_dataset", "Sample", "pair_files", "IMAGE_SUFFIXES", "image_files",
    "read_image", "read_label_ids", "read_label_rgb", "render_scene", "DatasetMeta", "dataset_meta",
    "display_meta", "default_palette", "IGNORE_INDEX", "TrainTransform", "EvalTransform", "PhotoMetricDistortion",
    "normalize", "denormalize",
]
