"""Training and evaluation transforms in the manner of mmsegmentation's pipelines, numpy/PIL only.

A transform is a callable ``(image, label) -> (image_tensor, label_tensor)`` taking
``image`` uint8 (H, W, 3) RGB and ``label`` int (H, W) with 255 = ignore, and returning
FloatTensor (3, h, w) normalised and LongTensor (h, w).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError

Size = tuple[int, int]
Triple = Sequence[float]

__all__ = ["TrainTransform", "EvalTransform", "PhotoMetricDistortion", "rescale_size", "resize_image",
           "resize_label", "normalize", "denormalize", "worker_rng"]


# ----------------------------------------------------------------------------------------------- helpers
def rescale_size(h: int, w: int, scale: Sequence[float]) -> Size:
    """Keep-ratio size fitting ``scale`` (mmcv semantics: long edge <= max(scale), short <= min(scale))."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, 3) image to ``size`` = (h, w)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map (any integer dtype) to ``size`` = (h, w)."""
    h, w = label.shape
    if (h, w) == tuple(size):
        return label
    rows = np.minimum(((np.arange(size[0]) + 0.5) * (h / size[0])).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * (w / size[1])).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def normalize(image: np.ndarray, mean: Triple, std: Triple) -> torch.Tensor:
    """uint8/float (H, W, 3) in 0..255 -> FloatTensor (3, H, W) = (image / 255 - mean) / std."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize(image: torch.Tensor, mean: Triple = (0.5, 0.5, 0.5), std: Triple = (0.5, 0.5, 0.5)) -> np.ndarray:
    """Inverse of :func:`normalize`: (3, H, W) tensor -> uint8 (H, W, 3)."""
    x = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    x = (x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def label_tensor(label: np.ndarray) -> torch.Tensor:
    """(H, W) int array -> LongTensor (H, W)."""
    return torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


def _check_pair(image: np.ndarray, label: Optional[np.ndarray]) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an (H, W, 3) RGB image, got shape {tuple(image.shape)}")
    if label is not None and label.shape != image.shape[:2]:
        raise InputError(f"label shape {tuple(label.shape)} does not match image size {tuple(image.shape[:2])}")


def worker_rng(seed: Optional[int]) -> np.random.Generator:
    """A generator for this process / DataLoader worker.

    Main process: seeded by ``seed``, or by ``torch.initial_seed()`` when ``seed`` is None.
    Worker: seeded by the worker's torch seed (base seed + worker id, new each epoch) mixed with ``seed``.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return np.random.default_rng(torch.initial_seed() if seed is None else seed)
    return np.random.default_rng([info.seed] if seed is None else [info.seed, seed])


class _Random:
    """Holds one generator per process/worker, created lazily (safe to pickle into workers)."""

    def __init__(self, seed: Optional[int]) -> None:
        self.seed = seed
        self._rng: Optional[np.random.Generator] = None
        self._owner: Optional[tuple[int, int]] = None

    @property
    def rng(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), -1 if info is None else info.id)
        if self._rng is None or owner != self._owner:
            self._rng, self._owner = worker_rng(self.seed), owner
        return self._rng

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rng"], state["_owner"] = None, None
        return state


# ---------------------------------------------------------------------------------- photometric distortion
def _hsv_jitter(rgb: np.ndarray, saturation: Optional[float], hue: Optional[int]) -> np.ndarray:
    """Scale saturation by ``saturation`` and shift hue by ``hue`` OpenCV units (2 degrees), uint8 HSV as mmcv."""
    hsv = np.asarray(Image.fromarray(rgb, "RGB").convert("HSV")).copy()  # PIL: H, S, V all 0..255
    if saturation is not None:
        hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * saturation, 0, 255).astype(np.uint8)
    if hue is not None:
        shift = int(round(hue * 256 / 180))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion: each step applied with probability 1/2, clipping to 0..255 after each.

    brightness (+U(-32, 32)), contrast (x U(0.5, 1.5), before or after the colour steps, at random),
    saturation (x U(0.5, 1.5)), hue (+ an integer in [-18, 18) OpenCV hue units = 2 degrees).
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (H, W, 3)."""
        x = image.astype(np.float32)
        if rng.integers(2):
            x = np.clip(x + rng.uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            x = self._contrast(x, rng)
        sat = rng.uniform(*self.saturation_range) if rng.integers(2) else None
        hue = int(rng.integers(-self.hue_delta, self.hue_delta)) if rng.integers(2) else None
        if sat is not None or hue is not None:
            x = _hsv_jitter(np.rint(x).astype(np.uint8), sat, hue).astype(np.float32)
        if not contrast_first:
            x = self._contrast(x, rng)
        return np.rint(x).astype(np.uint8)

    def _contrast(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return np.clip(x * rng.uniform(*self.contrast_range), 0, 255)
        return x


# ---------------------------------------------------------------------------------------------- transforms
def _pair(size: Sequence[int], what: str) -> Size:
    if isinstance(size, int):
        return size, size
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"{what} must be (h, w) with positive sides, got {size!r}")
    return int(size[0]), int(size[1])


class TrainTransform(_Random):
    """mmseg training pipeline: random resize, random crop (cat_max_ratio), flip, photometric, normalise, pad.

    ``scale``: (long, short) target before the ratio (mmseg ``(2048, 512)``), the image is resized to fit
    ``scale * r`` keeping its aspect ratio, ``r ~ U(ratio_range)``; ``scale=None`` resizes by ``r`` relative
    to the original size; ``ratio_range=None`` means r = 1. The crop is drawn again (up to 10 times) until no
    class covers ``cat_max_ratio`` or more of its non-ignored pixels. The result is padded at the bottom/right
    to ``crop_size``: label with ``ignore_index``, image with 0 *after* normalisation (mmseg's order:
    Normalize, then Pad; that is the mean colour), and further to a multiple of ``size_divisor`` (the
    backbone's patch size: 14 for DINOv2, so a 240 x 320 crop becomes 252 x 322; training sets it).

    ``__call__(image uint8 (H, W, 3), label int (H, W)) -> (FloatTensor (3, h, w), LongTensor (h, w))``.
    """

    def __init__(self, crop_size: Sequence[int] = (512, 512), scale: Optional[Sequence[float]] = (2048, 512),
                 ratio_range: Optional[Sequence[float]] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, mean: Triple = (0.5, 0.5, 0.5),
                 std: Triple = (0.5, 0.5, 0.5), ignore_index: int = 255, seed: Optional[int] = None) -> None:
        super().__init__(seed)
        self.crop_size = _pair(crop_size, "crop_size")
        self.scale = None if scale is None else _pair(scale, "scale")
        if ratio_range is not None and not (0 < ratio_range[0] <= ratio_range[1]):
            raise ConfigError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        self.ratio_range = None if ratio_range is None else (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        self.size_divisor = 1

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        rng = self.rng
        image, label = self.random_resize(image, label, rng)
        image, label = self.random_crop(image, label, rng)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(np.ascontiguousarray(image), rng)
        return self.pad(normalize(image, self.mean, self.std), label_tensor(label))

    def random_resize(self, image: np.ndarray, label: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Keep-ratio resize to fit ``scale * r`` (or by ``r`` when scale is None)."""
        if self.scale is None and self.ratio_range is None:
            return image, label
        r = 1.0 if self.ratio_range is None else float(rng.uniform(*self.ratio_range))
        h, w = label.shape
        if self.scale is None:
            size = (max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5)))
        else:
            size = rescale_size(h, w, (self.scale[0] * r, self.scale[1] * r))
        return resize_image(image, size), resize_label(label, size)

    def crop_box(self, shape: Size, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A random (y0, y1, x0, x1) crop of at most ``crop_size`` inside ``shape``."""
        (h, w), (ch, cw) = shape, self.crop_size
        y0 = int(rng.integers(0, max(h - ch, 0) + 1))
        x0 = int(rng.integers(0, max(w - cw, 0) + 1))
        return y0, min(y0 + ch, h), x0, min(x0 + cw, w)

    def random_crop(self, image: np.ndarray, label: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Crop; redraw up to 10 times while one class covers >= cat_max_ratio of the crop (or it has < 2)."""
        box = self.crop_box(label.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = label[box[0]:box[1], box[2]:box[3]]
                counts = np.bincount(crop[crop != self.ignore_index].ravel())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self.crop_box(label.shape, rng)
        y0, y1, x0, x1 = box
        return image[y0:y1, x0:x1], label[y0:y1, x0:x1]

    def pad(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad (3, h, w) / (h, w) at the bottom/right to ``crop_size``, rounded up to a multiple of
        ``size_divisor``, with 0 / ``ignore_index``."""
        d = self.size_divisor
        h, w = label.shape
        th, tw = (-(-max(c, s) // d) * d for c, s in zip(self.crop_size, (h, w)))
        if (h, w) == (th, tw):
            return image, label
        out_img = image.new_zeros(3, th, tw)
        out_lab = label.new_full((th, tw), self.ignore_index)
        out_img[:, :h, :w] = image
        out_lab[:h, :w] = label
        return out_img, out_lab

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
                f"photometric={self.photometric is not None}, seed={self.seed})")


class EvalTransform:
    """Optional keep-ratio resize of the image to fit ``scale`` (mmseg test pipeline), then normalise.

    The label keeps its original size (metrics are computed at the original resolution).
    ``__call__(image uint8 (H, W, 3), label (H, W) or None) -> (FloatTensor (3, h, w), LongTensor (H, W) or None)``.
    """

    def __init__(self, scale: Optional[Sequence[float]] = None, mean: Triple = (0.5, 0.5, 0.5),
                 std: Triple = (0.5, 0.5, 0.5)) -> None:
        self.scale = None if scale is None else _pair(scale, "scale")
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray,
                 label: Optional[np.ndarray] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        _check_pair(image, label)
        if self.scale is not None:
            image = resize_image(image, rescale_size(image.shape[0], image.shape[1], self.scale))
        return normalize(image, self.mean, self.std), None if label is None else label_tensor(label)

    def __repr__(self) -> str:
        return f"EvalTransform(scale={self.scale})"
