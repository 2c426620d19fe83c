"""Procedural street scenes: a stand-in dataset that needs no download.

Large easy regions (sky at the top, road and sidewalk below the horizon, buildings with windows,
trees with leafy texture) and small hard objects (thin poles, small people, cars), with random
colours, textures, lighting and noise. Each image is a pure function of (seed, split, index).
Classes (see :mod:`dtop.data.meta`): sky, building, road, sidewalk, tree, car, pole, person.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError
from .base import SegDataset, Transform
from .meta import dataset_meta

SKY, BUILDING, ROAD, SIDEWALK, TREE, CAR, POLE, PERSON = range(8)


class _Canvas:
    """An image (H, W, 3) float32 and label (H, W) uint8 painted back to front; shapes are clipped."""

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        self.image = np.empty((h, w, 3), np.float32)
        self.label = np.empty((h, w), np.uint8)

    def box(self, y0: float, y1: float, x0: float, x1: float) -> Optional[tuple[slice, slice]]:
        ys, ye = max(int(round(y0)), 0), min(int(round(y1)), self.h)
        xs, xe = max(int(round(x0)), 0), min(int(round(x1)), self.w)
        if ye <= ys or xe <= xs:
            return None
        return slice(ys, ye), slice(xs, xe)

    def rect(self, y0: float, y1: float, x0: float, x1: float, colour: np.ndarray, cls: int,
             jitter: float = 0.0) -> None:
        """Fill a rectangle with ``colour`` (+ per-pixel jitter of std ``jitter``)."""
        b = self.box(y0, y1, x0, x1)
        if b is None:
            return
        region = self.image[b]
        region[:] = colour
        if jitter:
            region += self.rng.standard_normal(region.shape[:2] + (1,), dtype=np.float32) * jitter
        self.label[b] = cls

    def mask(self, y0: int, x0: int, m: np.ndarray, colour: np.ndarray, cls: int) -> None:
        """Paint ``colour`` ((3,) or (h, w, 3)) where the boolean ``m`` (placed at y0, x0) is True."""
        b = self.box(y0, y0 + m.shape[0], x0, x0 + m.shape[1])
        if b is None:
            return
        my = slice(b[0].start - y0, b[0].stop - y0)
        mx = slice(b[1].start - x0, b[1].stop - x0)
        m = m[my, mx]
        if np.ndim(colour) == 3:
            colour = colour[my, mx][m]
        self.image[b][m] = colour
        self.label[b][m] = cls


def _block_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """(h, w) float32 noise in [0, 1) constant on ``cell`` x ``cell`` blocks."""
    small = rng.random((h // cell + 1, w // cell + 1), dtype=np.float32)
    return np.repeat(np.repeat(small, cell, 0), cell, 1)[:h, :w]


def _colour(rng: np.random.Generator, base: Sequence[float], spread: float) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32), 0, 255)


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float = 8.0) -> np.ndarray:
    return _colour(rng, [rng.uniform(lo, hi)] * 3, tint)


class _Scene:
    """Geometry shared by the painters: horizon, vanishing point and road half-width at the bottom."""

    def __init__(self, c: _Canvas) -> None:
        rng = c.rng
        self.c = c
        self.horizon = int(c.h * rng.uniform(0.35, 0.55))
        self.vx = c.w * rng.uniform(0.35, 0.65)
        self.road_half = c.w * rng.uniform(0.25, 0.5)

    def depth(self, y: float) -> float:
        """0 at the horizon, 1 at the bottom row."""
        return float(np.clip((y - self.horizon + 1) / (self.c.h - self.horizon), 0.02, 1.0))

    def road_edge(self, y: float, side: int) -> float:
        return self.vx + side * self.depth(y) * self.road_half

    # -- large regions ------------------------------------------------------------------------------
    def sky(self) -> None:
        c, rng = self.c, self.c.rng
        top = _colour(rng, [70, 120, 190], 40) if rng.random() < 0.7 else _grey(rng, 150, 210, 10)
        bottom = np.clip(top + rng.uniform(20, 70), 0, 255)
        t = (np.arange(self.horizon, dtype=np.float32) / max(self.horizon, 1))[:, None, None]
        c.image[: self.horizon] = top + (bottom - top) * t
        clouds = _block_noise(rng, self.horizon, c.w, max(2, c.w // 24))
        c.image[: self.horizon] += (np.clip(clouds - 0.6, 0, None) * rng.uniform(0, 90))[..., None]
        c.label[: self.horizon] = SKY

    def buildings(self) -> None:
        c, rng = self.c, self.c.rng
        x = -rng.uniform(0, c.w / 6)
        while x < c.w:
            bw = rng.uniform(c.w / 10, c.w / 3)
            if rng.random() < 0.2:  # a gap showing the sky
                x += bw / 2
                continue
            top = rng.uniform(0.03 * c.h, max(self.horizon - c.h / 8, 0.05 * c.h))
            base = _colour(rng, [rng.uniform(70, 190)] * 3, 45)
            c.rect(top, self.horizon, x, x + bw, base, BUILDING, jitter=4.0)
            self._windows(top, x, bw, base)
            x += bw
        c.image[: self.horizon] *= rng.uniform(0.8, 1.15)

    def _windows(self, top: float, x0: float, bw: float, base: np.ndarray) -> None:
        c, rng = self.c, self.c.rng
        b = c.box(top + 3, self.horizon - 3, x0 + 2, x0 + bw - 2)
        if b is None:
            return
        py, px = int(rng.integers(5, 11)), int(rng.integers(4, 10))
        wy, wx = max(1, int(py * rng.uniform(0.4, 0.7))), max(1, int(px * rng.uniform(0.4, 0.7)))
        ys = (np.arange(b[0].start, b[0].stop) - b[0].start) % py < wy
        xs = (np.arange(b[1].start, b[1].stop) - b[1].start) % px < wx
        win = _colour(rng, [40, 50, 70], 25) if rng.random() < 0.7 else _colour(rng, [220, 200, 120], 30)
        region = c.image[b]
        region[ys[:, None] & xs[None, :]] = win

    def ground(self) -> None:
        c, rng = self.c, self.c.rng
        h0 = self.horizon
        rows = np.arange(h0, c.h, dtype=np.float32)
        depth = np.clip((rows - h0 + 1) / (c.h - h0), 0.02, 1.0)[:, None]
        dx = np.abs(np.arange(c.w, dtype=np.float32)[None, :] - self.vx)
        road = dx < depth * self.road_half
        walk_col = _colour(rng, [rng.uniform(110, 200)] * 3 + np.array([25, 0, 0]) * rng.random(), 20)
        road_col = _grey(rng, 55, 115, 6)
        tiles = (((rows[:, None] - h0) % max(2, int(rng.integers(4, 9)))) < 1)
        region = c.image[h0:]
        region[:] = np.where(road[..., None], road_col, walk_col)
        region[~road & tiles] *= 0.8
        region += (_block_noise(rng, c.h - h0, c.w, 2)[..., None] - 0.5) * 18
        c.label[h0:] = np.where(road, ROAD, SIDEWALK)
        if rng.random() < 0.8:  # dashed centre line (label: road)
            dash = (np.floor(6.0 / depth) % 2 == 0) & (dx < np.maximum(depth * c.w / 90, 0.5))
            region[dash] = _colour(rng, [230, 225, 200], 20)

    # -- objects ------------------------------------------------------------------------------------
    def tree(self) -> None:
        c, rng = self.c, self.c.rng
        side = 1 if rng.random() < 0.5 else -1
        base_y = self.horizon + rng.uniform(1, 0.3 * (c.h - self.horizon))
        d = self.depth(base_y)
        x = self.road_edge(base_y, side) + side * rng.uniform(4, 30) * (0.5 + d)
        rx = c.w * rng.uniform(0.05, 0.12) * (0.6 + d)
        ry = rx * rng.uniform(0.9, 1.4)
        trunk_h = ry * rng.uniform(0.6, 1.2)
        cy = base_y - trunk_h - ry * 0.6
        tw = max(1.0, rx * 0.18)
        c.rect(cy, base_y, x - tw / 2, x + tw / 2, _colour(rng, [90, 60, 35], 20), TREE, jitter=6.0)
        hh, ww = int(2 * ry) + 1, int(2 * rx) + 1
        yy = (np.arange(hh, dtype=np.float32)[:, None] - ry) / ry
        xx = (np.arange(ww, dtype=np.float32)[None, :] - rx) / rx
        wobble = 0.75 + 0.35 * _block_noise(rng, hh, ww, max(2, int(rx / 3)))
        canopy = yy ** 2 + xx ** 2 < wobble
        leaves = _block_noise(rng, hh, ww, 2)[..., None]
        green = _colour(rng, [60, 110, 40], 30)
        c.mask(int(cy - ry), int(x - rx), canopy, green * (0.6 + 0.8 * leaves), TREE)

    def car(self, base_y: float) -> None:
        c, rng = self.c, self.c.rng
        d = self.depth(base_y)
        cw = max(5.0, c.w * rng.uniform(0.12, 0.22) * d)
        ch = cw * rng.uniform(0.45, 0.6)
        x = self.vx + rng.uniform(-0.8, 0.8) * d * self.road_half
        body = _colour(rng, rng.uniform(0, 255, 3), 10)
        c.rect(base_y - ch * 0.55, base_y - ch * 0.1, x - cw / 2, x + cw / 2, body, CAR, jitter=3.0)
        c.rect(base_y - ch, base_y - ch * 0.55, x - cw * 0.33, x + cw * 0.33, body * 0.9, CAR)
        c.rect(base_y - ch * 0.92, base_y - ch * 0.6, x - cw * 0.28, x + cw * 0.28,
               _colour(rng, [50, 60, 80], 15), CAR)
        wheel = _grey(rng, 15, 40, 3)
        for wx in (x - cw * 0.4, x + cw * 0.25):
            c.rect(base_y - ch * 0.2, base_y, wx, wx + max(1.0, cw * 0.15), wheel, CAR)

    def pole(self, base_y: float) -> None:
        c, rng = self.c, self.c.rng
        d = self.depth(base_y)
        side = 1 if rng.random() < 0.5 else -1
        x = self.road_edge(base_y, side) + side * rng.uniform(1, 8) * (0.5 + d)
        height = c.h * rng.uniform(0.3, 0.6) * (0.4 + 0.6 * d)
        width = max(1.0, round(1 + 2.5 * d * rng.random()))
        colour = _grey(rng, 60, 170, 10)
        c.rect(base_y - height, base_y, x, x + width, colour, POLE, jitter=5.0)
        if rng.random() < 0.5:  # lamp arm or sign
            arm = rng.uniform(3, 10) * (0.5 + d)
            ax0, ax1 = (x - arm, x) if side > 0 else (x + width, x + width + arm)
            c.rect(base_y - height, base_y - height + width, ax0, ax1, colour, POLE)

    def person(self, base_y: float) -> None:
        c, rng = self.c, self.c.rng
        d = self.depth(base_y)
        side = 1 if rng.random() < 0.5 else -1
        x = self.road_edge(base_y, side) + side * rng.uniform(2, 40) * (0.4 + d)
        ph = max(5.0, c.h * rng.uniform(0.1, 0.2) * (0.3 + 0.7 * d))
        pw = max(2.0, ph * rng.uniform(0.25, 0.35))
        skin = _colour(rng, [200, 160, 130], 40)
        shirt, trousers = _colour(rng, rng.uniform(0, 255, 3), 5), _colour(rng, rng.uniform(0, 160, 3), 5)
        c.rect(base_y - ph * 0.45, base_y, x - pw * 0.4, x - pw * 0.05, trousers, PERSON)
        c.rect(base_y - ph * 0.45, base_y, x + pw * 0.05, x + pw * 0.4, trousers, PERSON)
        c.rect(base_y - ph * 0.82, base_y - ph * 0.42, x - pw / 2, x + pw / 2, shirt, PERSON, jitter=4.0)
        r = max(1.0, ph * 0.09)
        yy, xx = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
        c.mask(int(base_y - ph * 0.82 - 2 * r), int(x - r), yy ** 2 + xx ** 2 <= r * r + 0.5, skin, PERSON)


def render_scene(size: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (image uint8 (H, W, 3), label int64 (H, W)) with ids 0..7."""
    h, w = int(size[0]), int(size[1])
    c = _Canvas(h, w, rng)
    s = _Scene(c)
    s.sky()
    s.buildings()
    s.ground()
    for _ in range(int(rng.integers(1, 4))):  # trees stand behind the other objects
        s.tree()
    objects = [s.car] * int(rng.integers(1, 5)) + [s.pole] * int(rng.integers(1, 5)) \
        + [s.person] * int(rng.integers(1, 6))
    bases = s.horizon + rng.uniform(0.05, 1.0, len(objects)) * (h - s.horizon)
    for j in np.argsort(bases, kind="stable"):  # far (near the horizon) first
        objects[j](float(bases[j]))
    # lighting, colour cast and sensor noise
    c.image *= rng.uniform(0.7, 1.2)
    c.image += rng.uniform(-15, 15, 3).astype(np.float32)
    c.image += rng.standard_normal((h, w, 1), dtype=np.float32) * rng.uniform(2, 8)
    return np.clip(c.image, 0, 255).astype(np.uint8), c.label.astype(np.int64)


class SyntheticScenes(SegDataset):
    """``num_images`` procedural street scenes of ``size`` (H, W); image i depends only on (seed, split, i).

    ``load(i) -> (uint8 (H, W, 3), int64 (H, W))``; ``__getitem__`` applies ``transform``
    (default :class:`~dtop.data.transforms.EvalTransform`).
    """

    def __init__(self, num_images: int = 64, size: Sequence[int] = (128, 192), seed: int = 0,
                 split: str = "train", transform: Optional[Transform] = None) -> None:
        meta = dataset_meta("synthetic")
        super().__init__([], meta.classes, meta.palette, transform, split=split)
        if num_images < 1 or len(size) != 2 or min(size) < 16:
            raise ConfigError(f"SyntheticScenes needs num_images >= 1 and size (H, W) >= 16, "
                              f"got {num_images}, {tuple(size)}")
        self.num_images = int(num_images)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_images

    def name(self, i: int) -> str:
        return f"synthetic_{self.split}_{i:05d}"

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        i %= self.num_images
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), i])
        return render_scene(self.size, rng)
