"""Datasets, transforms and class metadata for semantic segmentation.

    ds = build_dataset("camvid", "train", root="data/camvid", transform=TrainTransform((240, 320), scale=None))
    item = ds[0]  # dict(image=FloatTensor (3, h, w), label=LongTensor (h, w), name=str)
"""
from .datasets import (ADE20K, DATASETS, CamVid, Cityscapes, COCOStuff10K, FolderDataset, PascalContext59, Sample,
                       SegDataset, build_dataset, pair_files, read_image, read_label_ids, read_label_rgb)
from .meta import IGNORE_INDEX, DatasetMeta, dataset_meta, default_palette, list_dataset_meta
from .synthetic import SyntheticScenes, render_scene
from .transforms import EvalTransform, PhotoMetricDistortion, TrainTransform, denormalize, normalize

__all__ = [
    "SegDataset", "ADE20K", "PascalContext59", "COCOStuff10K", "Cityscapes", "CamVid", "FolderDataset",
    "SyntheticScenes", "DATASETS", "build_dataset", "Sample", "pair_files", "read_image", "read_label_ids",
    "read_label_rgb", "render_scene", "DatasetMeta", "dataset_meta", "list_dataset_meta", "default_palette",
    "IGNORE_INDEX", "TrainTransform", "EvalTransform", "PhotoMetricDistortion", "normalize", "denormalize",
]
