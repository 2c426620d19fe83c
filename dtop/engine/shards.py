"""Evaluation across processes and across interruptions: per-image results kept on disk, shared by ranks.

An evaluation is a sum over images (the (K, K) histogram, GFLOPs, exit fractions) plus one row per image,
so it splits into per-image :class:`ImageResult` records that can be computed anywhere, in any order, and
added up afterwards in image order, which makes the totals bit-identical to one process going through
the images in turn.

:class:`PartialResults` keeps those records in ``<variant>.partial/``: one JSON-lines file per rank,
each line appended and flushed (fsync) as soon as its image is done, and a ``meta.json`` fingerprint of
what is being evaluated (checkpoint, exit rule, evaluation settings, images). A rerun of the same
evaluation skips the images already on disk, and a line cut short by a crash is ignored; a fingerprint
that differs (another checkpoint, another p0) starts afresh. Under ``torchrun`` the ranks split the
images still to do (rank ``r`` takes every ``world``-th one: no padding, no duplicates), and rank 0
counts every rank's finished lines for its progress bar.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from ..jsonio import dumps, write_json


@dataclass
class ImageResult:
    """One image's share of an evaluation: its index in the dataset, its ``per_image.csv`` row, its raw exit
    fractions per stage, and its histogram as sparse ``[flat index label * K + prediction, count]`` pairs."""

    index: int
    row: dict[str, Any]
    exits: list[float]
    hist: list[list[int]]

    @classmethod
    def make(cls, index: int, row: dict[str, Any], exits: torch.Tensor, hist: torch.Tensor) -> "ImageResult":
        flat = hist.flatten()
        nz = flat.nonzero().flatten()
        return cls(index, row, [float(v) for v in exits.float()], [[int(i), int(flat[i])] for i in nz])


def combine(results: Iterable[ImageResult], K: int, S: int) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """The (K, K) histogram, the (S,) float32 sum of exit fractions and the rows, added up in image order."""
    hist = torch.zeros(K * K, dtype=torch.long)
    exit_sum = torch.zeros(S)
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        for i, c in r.hist:
            hist[i] += c
        exit_sum += torch.tensor(r.exits, dtype=torch.float32)
        rows.append(r.row)
    return hist.reshape(K, K), exit_sum, rows


class PartialResults:
    """Per-image results of one evaluation in ``folder`` (see the module docstring); ``fingerprint``: what
    is evaluated (a dict of JSON values). ``folder`` None keeps nothing on disk."""

    def __init__(self, folder: Optional[Path], fingerprint: dict[str, Any], rank: int = 0) -> None:
        self.folder, self.fingerprint, self.rank = (Path(folder) if folder else None), fingerprint, rank
        self._file = None
        self.loaded_lines = 0  # lines :meth:`load` found (a line cut short included): progress counts past them

    def load(self) -> dict[int, ImageResult]:
        """The results already on disk (every rank's), by image index; clears a folder whose fingerprint differs."""
        if self.folder is None or not self.folder.is_dir():
            return {}
        meta = self.folder / "meta.json"
        try:
            same = json.loads(meta.read_text()) == json.loads(dumps(self.fingerprint))
        except (OSError, ValueError):
            same = False
        if not same:
            if self.rank == 0:
                warn_restart(self.folder)
            return {}
        done: dict[int, ImageResult] = {}
        self.loaded_lines = self.count()
        for path in sorted(self.folder.glob("rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    r = ImageResult(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # a line cut short by a crash: that image runs again
                r.row = {k: math.nan if v is None else v for k, v in r.row.items()}  # JSON's null: undefined
                done.setdefault(r.index, r)
        return done

    def start(self, resumed: bool) -> None:
        """Rank 0 (re)creates the folder and its fingerprint unless resuming; every rank opens its file.
        Call on every rank, then :func:`barrier`."""
        if self.folder is None:
            return
        if self.rank == 0 and not resumed:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            write_json(self.folder / "meta.json", self.fingerprint)
        barrier()
        path = self.folder / f"rank{self.rank}.jsonl"
        cut = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        self._file = open(path, "a")
        if cut:  # a line cut short by a crash: end it, so the next result starts a line of its own
            self._file.write("\n")

    def append(self, result: ImageResult) -> None:
        """Keep one image's result (one line, flushed to disk before returning)."""
        if self._file is None:
            return
        self._file.write(dumps(asdict(result)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def count(self) -> int:
        """Lines written so far by every rank (rank 0's progress across ranks)."""
        if self.folder is None:
            return 0
        n = 0
        for path in self.folder.glob("rank*.jsonl"):
            try:
                n += path.read_bytes().count(b"\n")
            except OSError:
                pass
        return n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Rank 0: delete the folder once the finished results are written."""
        self.close()
        if self.folder is not None and self.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def gather_results(mine: list[ImageResult]) -> list[ImageResult]:
    """Every rank's results on every rank (``all_gather_object``); ``mine`` alone without a process group."""
    rank, size = world()
    if size == 1:
        return mine
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, [asdict(r) for r in mine])
    return [ImageResult(**d) for part in parts for d in part]


def warn_restart(folder: Path) -> None:
    warnings.warn(f"{folder}: partial results of another evaluation (checkpoint, settings or images differ); "
                  f"starting afresh", UserWarning, stacklevel=3)
