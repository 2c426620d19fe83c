"""The dataset registry: ``data.name`` in a config -> a dataset class."""
from __future__ import annotations

import inspect
from typing import Optional

from ..errors import ConfigError, unknown_name
from .base import SegDataset, Transform
from .datasets import ADE20K, CamVid, Cityscapes, COCOStuff10K, FolderDataset, PascalContext59
from .synthetic import SyntheticScenes

DATASETS: dict[str, type] = {
    "ade20k": ADE20K,
    "pascal_context59": PascalContext59,
    "coco_stuff10k": COCOStuff10K,
    "cityscapes": Cityscapes,
    "camvid": CamVid,
    "folder": FolderDataset,
    "synthetic": SyntheticScenes,
}


def build_dataset(name: str, split: str = "train", transform: Optional[Transform] = None,
                  ignore_index: Optional[int] = None, **kwargs) -> SegDataset:
    """``DATASETS[name](split=split, transform=transform, **kwargs)``; ConfigError for an unknown name or
    options the dataset does not take (naming the ones it does). ``ignore_index`` (``data.ignore_index``;
    None: the dataset's default, 255) is given to every dataset, also one whose constructor does not take it
    (:meth:`SegDataset.set_ignore_index`)."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise unknown_name("dataset", name, sorted(DATASETS))
    cls = DATASETS[key]
    takes_ignore = "ignore_index" in inspect.signature(cls).parameters
    if ignore_index is not None and takes_ignore:
        kwargs["ignore_index"] = ignore_index
    try:
        inspect.signature(cls).bind(split=split, transform=transform, **kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters if p not in ("split", "transform")]
        raise ConfigError(f"dataset {key!r}: {e}; it takes {', '.join(params)}") from e
    dataset = cls(split=split, transform=transform, **kwargs)
    if ignore_index is not None and not takes_ignore:
        dataset.set_ignore_index(ignore_index)
    return dataset
