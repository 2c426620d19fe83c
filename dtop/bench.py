"""Wall-clock speed of DToP against the dense model, measured side by side in one process.

Batch-1 latency and mixed-batch throughput (each batch holds different images, so each image keeps a
different number of tokens), peak memory and GFLOPs, for the dense model and for DToP in each
execution layout. After a warm-up, dense and DToP calls on the same input run back to back, and the
sums of per-input medians are compared, so machine noise and drift hit both sides alike. Without a
checkpoint, per-image exit fractions are forced at the first exit stage so that the speed path is
measured alone.
"""
from __future__ import annotations

import statistics
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .flops import dense_flops
from .pruning.execution import varlen_kernel_available


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage allocated inside the context (CPU stand-in for
    ``torch.cuda.max_memory_allocated`` after a reset; counts the storages ops create, not tensors
    that existed before, such as weights and inputs, nor kernels' private scratch)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)

        def release(k: int = key, n: int = size) -> None:
            self.current -= n
            self._seen.discard(k)

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage (a view such as a weight's transpose, an in-place result)
        # allocates nothing: only storages the op created are counted
        # (oneDNN-packed weights, dtop.models.packed, are opaque: they have no storage and are not outputs)
        held = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, Tensor) and not t.is_mkldnn}
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and not t.is_mkldnn and t.untyped_storage().data_ptr() not in held:
                self._track(t)
        return out


def forced_exits(fractions: Sequence[float], seed: int = 0) -> Callable[[int, Tensor, Tensor], Tensor]:
    """An exit override: at the first exit stage image b loses ``fractions[b]`` of its tokens
    (a fixed random choice, made on the device without host syncs); nothing exits later."""

    def choose(stage: int, conf: Tensor, valid: Tensor) -> Tensor:
        if stage > 0:
            return torch.zeros_like(valid)
        B = valid.shape[0]
        g = torch.Generator(device=valid.device).manual_seed(seed)
        scores = torch.rand(valid.shape, generator=g, device=valid.device).masked_fill(~valid, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each token among its image's tokens
        frac = torch.tensor([fractions[b % len(fractions)] for b in range(B)], device=valid.device)
        return valid & (rank < (frac * valid.sum(1)).round()[:, None])

    return choose


@dataclass
class Timing:
    """Seconds per call: ``dense[i][r]`` is repeat ``r`` of item ``i`` (one image alone, or a whole batch)."""

    dense: list[list[float]]
    dtop: list[list[float]]

    def total(self, which: str) -> float:
        """Sum over the items of their median time."""
        return sum(statistics.median(t) for t in getattr(self, which))

    def ratio(self) -> float:
        return self.total("dtop") / self.total("dense")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternate(dense_fns: Sequence[Callable[[], Any]], dtop_fns: Sequence[Callable[[], Any]], device: torch.device,
              warmup: int, repeats: int) -> Timing:
    """Warm up, then ``repeats`` times time item ``i`` dense and DToP back to back, for every item: a drift
    in the machine's speed (other tenants, clocks) hits both sides of each pair alike. The order within a
    pair alternates between repeats (dense first, then DToP first), so that neither side always runs
    second, on caches the other warmed."""
    for _ in range(warmup):
        for d, p in zip(dense_fns, dtop_fns):
            d()
            p()
    t = Timing([[] for _ in dense_fns], [[] for _ in dtop_fns])
    for r in range(repeats):
        for i, (d, p) in enumerate(zip(dense_fns, dtop_fns)):
            if r % 2:
                t.dtop[i].append(_time(p, device))
            t.dense[i].append(_time(d, device))
            if not r % 2:
                t.dtop[i].append(_time(p, device))
    return t


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    with PeakTensorMemory() as mode:
        fn()
    return mode.peak / 2 ** 20


def load_images(folder: str, size: tuple[int, int], limit: int, mean=(0.5,) * 3, std=(0.5,) * 3) -> Tensor:
    """Up to ``limit`` images of a folder, resized to ``size`` and normalised -> (n, 3, H, W)."""
    import numpy as np
    from PIL import Image

    from .errors import InputError

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not files:
        raise InputError(f"no images (.png/.jpg/.bmp) in {folder}")
    out = []
    for p in files[:limit]:
        try:
            im = Image.open(p).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        except OSError as e:
            raise InputError(f"cannot read image {p}: {e}") from e
        a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((a - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(out)


def run_bench(model, images: Tensor, batch: int, paths: Sequence[str], device: torch.device,
              dtype: torch.dtype = torch.float32, warmup: int = 2, repeats: int = 5,
              exit_fractions: Optional[Sequence[float]] = None, bucket: bool = False) -> dict[str, Any]:
    """Measure dense vs DToP; ``images`` (n >= batch, 3, H, W). Returns the result dict."""
    model.eval().to(device)
    images = images.to(device)
    size = tuple(images.shape[-2:])
    saved_p0 = model.cfg.p0
    if exit_fractions is not None:  # the override replaces the decisions; p0 < 1 makes them run
        model.set_p0(0.5)
    amp = torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    mixed = images[:batch]
    singles = [images[i:i + 1] for i in range(min(len(images), batch))]
    # each image keeps its own exit pattern whether it runs alone or in the mixed batch
    batch_exits = forced_exits(exit_fractions) if exit_fractions is not None else None
    single_exits = [forced_exits([exit_fractions[i % len(exit_fractions)]]) if exit_fractions is not None else None
                    for i in range(len(singles))]

    def dense_call(x: Tensor) -> Callable[[], Any]:
        def run():
            with torch.no_grad(), amp:
                model.forward_dense(x)
        return run

    def dtop_call(x: Tensor, force) -> Callable[[], Any]:
        def run():
            model.force_exit = force
            with torch.no_grad(), amp:
                return model(x)
        return run

    dense_batch, dtop_batch = dense_call(mixed), dtop_call(mixed, batch_exits)
    dense_singles = [dense_call(im) for im in singles]
    dtop_singles = [dtop_call(im, force) for im, force in zip(singles, single_exits)]

    out = dtop_batch()
    base_gflops = dense_flops(model, size, final_head_only=True) / 1e9
    flop_ratio = float(out.gflops.mean()) / base_gflops
    alone = [run() for run in dtop_singles]
    flop_ratios_b1 = [float(o.gflops) / base_gflops for o in alone]
    flop_ratio_b1 = statistics.mean(flop_ratios_b1)
    result: dict[str, Any] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "size": list(size), "batch": batch,
        "gflops_dense": round(base_gflops, 3), "gflops_dtop": round(float(out.gflops.mean()), 3),
        "flop_ratio": round(flop_ratio, 4), "flop_ratio_batch1": round(flop_ratio_b1, 4),
        "exit_fractions": [round(float(f), 3) for f in out.exit_fractions()[:, :-1].sum(1)],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "paths": {},
        "varlen_kernel": device.type == "cuda" and dtype != torch.float32 and varlen_kernel_available(),
    }
    result["peak_mem_dense_mb"] = round(peak_memory_mb(dense_batch, device), 1)
    for path in paths:
        model.set_execution(path, bucket=bucket and path == "padded")
        b1 = alternate(dense_singles, dtop_singles, device, warmup, repeats)
        mx = alternate([dense_batch], [dtop_batch], device, warmup, repeats)
        entry = {
            "time_ratio_batch1": round(b1.ratio(), 4), "time_ratio_mixed": round(mx.ratio(), 4),
            "realised_batch1": round(realised(b1.ratio(), flop_ratio_b1), 3),
            "realised_mixed": round(realised(mx.ratio(), flop_ratio), 3),
            "dense_ms_per_image_batch1": round(1e3 * b1.total("dense") / len(singles), 2),
            "dtop_ms_per_image_batch1": round(1e3 * b1.total("dtop") / len(singles), 2),
            # each image alone, to see which exit fractions lose the most of their FLOP saving
            "batch1_images": [{"exit_fraction": round(float(o.exit_fractions()[0, :-1].sum()), 3),
                               "flop_ratio": round(f, 4),
                               "time_ratio": round(statistics.median(t_dtop) / statistics.median(t_dense), 4)}
                              for o, f, t_dense, t_dtop in zip(alone, flop_ratios_b1, b1.dense, b1.dtop)],
            "dense_images_per_s_mixed": round(batch / mx.total("dense"), 2),
            "dtop_images_per_s_mixed": round(batch / mx.total("dtop"), 2),
            "peak_mem_dtop_mb": round(peak_memory_mb(dtop_batch, device), 1),
        }
        result["paths"][path] = entry
    model.force_exit = None
    model.set_p0(saved_p0)
    main = result["paths"][paths[0]]
    result.update({k: main[k] for k in ("time_ratio_batch1", "time_ratio_mixed", "realised_batch1", "realised_mixed",
                                        "peak_mem_dtop_mb")})
    result["path"] = paths[0]
    return result


def realised(time_ratio: float, flop_ratio: float) -> float:
    """Share of the FLOP saving that shows up as time saving: (1 - time ratio) / (1 - FLOP ratio)."""
    return (1 - time_ratio) / (1 - flop_ratio) if flop_ratio < 1 else float("nan")
