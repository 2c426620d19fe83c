"""``dtop bench``: wall-clock speed of DToP against the dense model, measured side by side in one process.

Batch-1 latency and mixed-batch throughput (each batch holds different images, so each image keeps a
different number of tokens), peak memory and GFLOPs, for the dense model and for DToP in each
token layout (:mod:`dtop.models.layouts`). After a warm-up, dense and DToP calls on the same input run back to back, and the
sums of per-input medians are compared, so machine noise and drift hit both sides alike. Without a
checkpoint, per-image exit fractions are forced at the first exit stage so that the speed path is
measured alone.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
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

from ..data import IMAGE_SUFFIXES, EvalTransform, read_image
from ..data.images import is_image_file
from ..data.transforms import resize_image
from ..engine.common import resolve_device
from ..engine.opcount import OpCount, count_ops
from ..errors import ConfigError, InputError
from ..flops import check_size, default_size, dense_flops, forward_gflops
from ..jsonio import dumps
from ..models import DToPSegmentor, Segmentor, create_model, load_model
from ..models.blocks import varlen_kernel_available
from ..models.layouts import LAYOUTS, default_layout
from ..models.packed import use_linear_kernel
from .common import (App, add_allocator, add_exit_options, add_linear, apply_exit_setting, exit_setting, note_no_exit,
                     set_allocator)


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

    def repeat_ratios(self) -> list[float]:
        """The time ratio of each repeat alone: its DToP times summed over the items over its dense times."""
        n = min(len(t) for t in self.dense + self.dtop)
        return [sum(t[r] for t in self.dtop) / sum(t[r] for t in self.dense) for r in range(n)]

    def ratio_range(self) -> list[float]:
        """[min, max] of :meth:`repeat_ratios`: how far the repeats spread around :meth:`ratio`."""
        ratios = self.repeat_ratios()
        return [min(ratios), max(ratios)]


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
    """Up to ``limit`` images of a folder (:func:`dtop.data.read_image`), resized to ``size`` and normalised
    -> (n, 3, H, W). InputError when the folder holds no image or one cannot be read."""
    files = sorted(p for p in Path(folder).iterdir() if is_image_file(p))
    if not files:
        raise InputError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in {folder}")
    normalise = EvalTransform(mean=mean, std=std)
    return torch.stack([normalise(resize_image(read_image(p), size))[0] for p in files[:limit]])


@dataclass
class _Calls:
    """The timed calls: dense and DToP on the mixed batch and on each of its images alone."""

    dense_batch: Callable[[], Any]
    dtop_batch: Callable[[], Any]
    dense_singles: list[Callable[[], Any]]
    dtop_singles: list[Callable[[], Any]]

    @classmethod
    def make(cls, model, images: Tensor, batch: int, amp, exit_fractions: Optional[Sequence[float]]) -> "_Calls":
        singles = [images[i:i + 1] for i in range(min(len(images), batch))]
        # each image keeps its own exit pattern whether it runs alone or in the mixed batch
        forced = exit_fractions is not None
        batch_exits = forced_exits(exit_fractions) if forced else None
        single_exits = [forced_exits([exit_fractions[i % len(exit_fractions)]]) if forced else None
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

        return cls(dense_call(images[:batch]), dtop_call(images[:batch], batch_exits),
                   [dense_call(im) for im in singles], [dtop_call(im, f) for im, f in zip(singles, single_exits)])


def _flop_fields(model, calls: _Calls, size: tuple[int, int]) -> tuple[dict[str, Any], list, list[float]]:
    """GFLOPs, FLOP ratios and exit fractions of the mixed batch and of each image alone."""
    out = calls.dtop_batch()
    gflops = forward_gflops(model, out)
    base = dense_flops(model, size, final_head_only=True) / 1e9
    alone = [run() for run in calls.dtop_singles]
    ratios_b1 = [float(forward_gflops(model, o)) / base for o in alone]
    fields = {"gflops_dense": base, "gflops_dtop": float(gflops.mean()), "flop_ratio": float(gflops.mean()) / base,
              "flop_ratio_batch1": statistics.mean(ratios_b1),
              "exit_fractions": [round(float(f), 3) for f in out.exit_fractions()[:, :-1].sum(1)]}
    return fields, alone, ratios_b1


_ROUND = {"gflops_dense": 3, "gflops_dtop": 3, "flop_ratio": 4, "flop_ratio_batch1": 4}


def _measure_layout(calls: _Calls, device: torch.device, warmup: int, repeats: int, batch: int,
                    flop_ratio: float, flop_ratio_b1: float, alone: list, ratios_b1: list[float]) -> dict[str, Any]:
    """Batch-1 and mixed-batch timings of the model's current layout against dense."""
    n = len(calls.dense_singles)
    b1 = alternate(calls.dense_singles, calls.dtop_singles, device, warmup, repeats)
    mx = alternate([calls.dense_batch], [calls.dtop_batch], device, warmup, repeats)
    return {
        "time_ratio_batch1": round(b1.ratio(), 4), "time_ratio_mixed": round(mx.ratio(), 4),
        "realised_batch1": round(realised(b1.ratio(), flop_ratio_b1), 3),
        "realised_mixed": round(realised(mx.ratio(), flop_ratio), 3),
        # the spread of the repeats: [min, max] of each repeat's own time ratio, and the realised shares they give
        **spread_fields("batch1", b1, flop_ratio_b1), **spread_fields("mixed", mx, flop_ratio),
        "dense_ms_per_image_batch1": round(1e3 * b1.total("dense") / n, 2),
        "dtop_ms_per_image_batch1": round(1e3 * b1.total("dtop") / n, 2),
        # each image alone, to see which exit fractions lose the most of their FLOP saving
        "batch1_images": [{"exit_fraction": round(float(o.exit_fractions()[0, :-1].sum()), 3),
                           "flop_ratio": round(f, 4),
                           "time_ratio": round(statistics.median(t_dtop) / statistics.median(t_dense), 4)}
                          for o, f, t_dense, t_dtop in zip(alone, ratios_b1, b1.dense, b1.dtop)],
        "dense_images_per_s_mixed": round(batch / mx.total("dense"), 2),
        "dtop_images_per_s_mixed": round(batch / mx.total("dtop"), 2),
        "peak_mem_dtop_mb": round(peak_memory_mb(calls.dtop_batch, device), 1),
    }


def run_bench(model, images: Tensor, batch: int, layouts: Sequence[str], device: torch.device,
              dtype: torch.dtype = torch.float32, warmup: int = 2, repeats: int = 5,
              exit_fractions: Optional[Sequence[float]] = None, bucket: bool = False) -> dict[str, Any]:
    """Measure dense vs DToP in each of ``layouts``; ``images`` (n, 3, H, W), the mixed batch is the first
    min(n, batch) of them (``result["batch"]``). Returns the result dict (``layouts``: one entry per layout;
    ``paths``/``path`` are deprecated aliases of ``layouts``/``layout``). InputError for a size H x W that is
    not whole patches, which the model refuses (:func:`dtop.flops.check_size`)."""
    size = tuple(int(s) for s in images.shape[-2:])
    check_size(model, size)
    batch = min(batch, len(images))
    model.eval().to(device)
    images = images.to(device)
    dtop_model = isinstance(model, DToPSegmentor)  # else a token-reduction alternative: no exits, no layouts
    saved_rule = model.exit_rule() if dtop_model else None
    if exit_fractions is not None and dtop_model:  # the override replaces the decisions; p0 < 1 makes them run
        model.set_p0(0.5)
    amp = torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    calls = _Calls.make(model, images, batch, amp, exit_fractions)
    flops, alone, ratios_b1 = _flop_fields(model, calls, size)
    result: dict[str, Any] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "size": list(size), "batch": batch,
        **{k: round(v, _ROUND[k]) if k in _ROUND else v for k, v in flops.items()},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats, "layouts": {},
        "varlen_kernel": device.type == "cuda" and dtype != torch.float32 and varlen_kernel_available(),
    }
    result["peak_mem_dense_mb"] = round(peak_memory_mb(calls.dense_batch, device), 1)
    for layout in layouts:
        if dtop_model:
            model.set_layout(layout, bucket=bucket and layout == "padded")
        result["layouts"][layout] = _measure_layout(calls, device, warmup, repeats, batch, flops["flop_ratio"],
                                                    flops["flop_ratio_batch1"], alone, ratios_b1)
    model.force_exit = None
    if dtop_model:
        model.set_exit_rule(saved_rule)
    main = result["layouts"][layouts[0]]
    result.update({k: main[k] for k in ("time_ratio_batch1", "time_ratio_mixed", "realised_batch1", "realised_mixed",
                                        "peak_mem_dtop_mb", "time_ratio_batch1_range", "time_ratio_mixed_range",
                                        "realised_batch1_range", "realised_mixed_range")})
    result["layout"] = layouts[0]
    result["paths"], result["path"] = result["layouts"], result["layout"]  # deprecated names
    return result


def spread_fields(which: str, timing: Timing, flop_ratio: float) -> dict[str, list[float]]:
    """``time_ratio_<which>_range``: [min, max] of the repeats' time ratios (:meth:`Timing.ratio_range`);
    ``realised_<which>_range``: the realised shares at those ratios, lowest first (NaN without a FLOP saving)."""
    lo, hi = timing.ratio_range()
    return {f"time_ratio_{which}_range": [round(lo, 4), round(hi, 4)],
            f"realised_{which}_range": [round(realised(hi, flop_ratio), 3), round(realised(lo, flop_ratio), 3)]}


def realised(time_ratio: float, flop_ratio: float) -> float:
    """Share of the FLOP saving that shows up as time saving: (1 - time ratio) / (1 - FLOP ratio); NaN when there
    is no FLOP saving (``null`` in ``--json``, ``n/a`` in the table)."""
    return (1 - time_ratio) / (1 - flop_ratio) if flop_ratio < 1 else float("nan")


def bench_model(args: argparse.Namespace) -> tuple[Segmentor, Tensor, Optional[list[float]]]:
    """The model, the images and the forced exit fractions (None: the heads decide) the options ask for."""
    budget = exit_setting(args)
    if budget is not None and (args.p0 is not None or args.exit_fractions is not None):
        raise ConfigError("--exit-ratio / --exit-mode budget choose the exits: drop --p0 and --exit-fractions")
    if args.checkpoint:
        if not args.images:
            raise ConfigError("--checkpoint needs --images DIR (real images to prune)")
        model = load_model(args.checkpoint)
        args.size = args.size or list(default_size(model))
        if args.p0 is not None and isinstance(model, DToPSegmentor):
            model.set_p0(args.p0)
        elif args.p0 is not None:
            print(f"dtop bench: warning: --p0 has no effect: {args.checkpoint} runs the {model.reducer.kind} token "
                  f"reduction, not early exit", file=sys.stderr)
        apply_exit_setting(model, budget, "dtop bench")
        note_no_exit(model, "dtop bench")
        images = load_images(args.images, tuple(args.size), args.batch)
        if len(images) < args.batch:
            print(f"dtop bench: warning: {args.images} holds {len(images)} image(s), fewer than --batch {args.batch}: "
                  f"the mixed batch has {len(images)}", file=sys.stderr)
        return model, images, None
    n = args.batch
    # the untrained heads decide at this p0, or under the budget rule (which exits exact counts whatever they say)
    heads_decide = (args.p0 is not None or budget is not None) and args.exit_fractions is None
    model = create_model(args.name, num_classes=args.num_classes, p0=args.p0 if args.p0 is not None else 0.5)
    apply_exit_setting(model, budget, "dtop bench")
    args.size = args.size or list(default_size(model))
    images = torch.randn(args.batch, 3, *args.size)
    fractions = None if heads_decide else (args.exit_fractions or [0.1 + 0.6 * i / max(1, n - 1) for i in range(n)])
    return model, images, fractions


def spread(n: int, lo: float = 0.3, hi: float = 0.9) -> list[float]:
    """Per-image exit fractions evenly spread from ``lo`` to ``hi`` over a batch of ``n``."""
    return [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]


def count_forward_ops(model: DToPSegmentor, size: tuple[int, int], batches: Sequence[int], layouts: Sequence[str],
                      fractions: Optional[Sequence[float]] = None) -> dict[str, Any]:
    """Dispatched operations, compute kernels and host syncs per forward (:mod:`dtop.engine.opcount`) of
    the dense model, of DToP in each layout with forced exits at the first exit stage (``fractions``, default
    a 0.3 ... 0.9 spread across each batch) and of DToP where nothing can leave (p0 1), at each batch size.
    Random inputs on the model's device; the counts do not depend on the values."""
    device = next(model.parameters()).device
    rule, force, layout = model.exit_rule(), model.force_exit, model.layout
    rows: dict[str, Any] = {}
    try:
        for B in batches:
            x = torch.randn(B, 3, *size, device=device)
            with torch.no_grad():
                model.forward_dense(x)  # a warm-up: lazy one-time work is not part of a forward's count
                row = {"dense": count_ops(lambda: model.forward_dense(x))[0].as_dict()}
                model.set_p0(0.5)
                choose = forced_exits(list(fractions) if fractions else spread(B))
                for name in layouts:
                    model.set_layout(name)
                    count = OpCount()

                    def harness_choice(stage: int, conf: Tensor, valid: Tensor, count: OpCount = count) -> Tensor:
                        with count.uncounted():  # the benchmark's own choice: a real forward has none
                            return choose(stage, conf, valid)

                    model.force_exit = harness_choice
                    model(x)  # warm-up, as for dense (cached head queries, packed weights)
                    row[name] = count_ops(lambda: model(x), count)[0].as_dict()
                model.force_exit = None
                model.set_p0(1.0)
                row["p0_1"] = count_ops(lambda: model(x))[0].as_dict()
            rows[str(B)] = row
    finally:
        model.set_exit_rule(rule)
        model.force_exit, model.layout = force, layout
    return rows


def print_op_counts(counts: dict[str, Any]) -> None:
    """The ``--count-ops`` table: per batch and variant, ops / kernels / syncs and the ratio to dense."""
    print("| batch | variant | ops | compute kernels | host syncs | ops vs dense | kernels vs dense |")
    print("|---|---|---|---|---|---|---|")
    for B, row in counts.items():
        dense = row["dense"]
        for name, c in row.items():
            print(f"| {B} | {name} | {c['ops']} | {c['kernels']} | {c['syncs']} | "
                  f"{c['ops'] / dense['ops']:.2f} | {c['kernels'] / dense['kernels']:.2f} |")


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", nargs="?", default="segvit_vit_b16", help="preset (ignored with --checkpoint)")
    sp.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                    help="default 512 x 512 rounded up to whole patches (518 x 518 for patch 14)")
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--num-classes", type=int, default=150)
    sp.add_argument("--checkpoint", help="a trained dtop checkpoint: prune real images at its p0")
    sp.add_argument("--images", help="folder of images for --checkpoint")
    sp.add_argument("--p0", type=float, default=None,
                    help="exit threshold: with --checkpoint, instead of the checkpoint's; without, the "
                         "(untrained) heads decide instead of --exit-fractions (--p0 1: nothing can exit, "
                         "the auxiliary heads are skipped)")
    sp.add_argument("--exit-fractions", type=float, nargs="+", default=None,
                    help="forced per-image fractions of tokens leaving at the first exit stage "
                         "(default: a spread 0.1 ... 0.7 across the batch)")
    sp.add_argument("--layouts", nargs="+", choices=LAYOUTS[1:], default=None,
                    help="token layouts to measure (default: all, the device's default first)")
    sp.add_argument("--paths", nargs="+", choices=LAYOUTS[1:], default=None, help="deprecated name of --layouts")
    sp.add_argument("--bucket", action="store_true", help="padded layout: bucket images by kept length")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--compile", action="store_true",
                    help="torch.compile the blocks and heads (dynamic shapes) for dense and DToP alike")
    sp.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile's mode (implies --compile); reduce-overhead: CUDA graphs, which need the "
                         "fixed shapes of budget exits (--exit-ratio) or of dense")
    sp.add_argument("--count-ops", action="store_true",
                    help="count dispatched ops and host syncs per forward instead of timing (dense, each layout, "
                         "p0 1) at each --count-batches size; forced exits: --exit-fractions, else a spread "
                         "0.3 ... 0.9 across each batch")
    sp.add_argument("--count-batches", type=int, nargs="+", default=[1, 8, 32])
    add_exit_options(sp)
    add_allocator(sp)
    add_linear(sp)


def check_bench_args(args: argparse.Namespace) -> None:
    """ConfigError for options no measurement can take: batches below 1, exit fractions outside [0, 1],
    ``--compile`` with ``--count-ops`` (the dispatch mode counts eager operations only)."""
    if args.batch < 1 or min(args.count_batches) < 1:
        raise ConfigError(f"--batch and --count-batches must be >= 1, got {args.batch} and {args.count_batches}")
    bad = [f for f in args.exit_fractions or [] if not 0.0 <= f <= 1.0]
    if bad:
        raise ConfigError(f"--exit-fractions are fractions of each image's tokens, in [0, 1]; got {bad}")
    if args.compile and args.count_ops:
        raise ConfigError("--count-ops counts eager dispatches; a compiled model's fused kernels are not visible to it: "
                          "drop --compile (or time the compiled model without --count-ops)")


def run(args: argparse.Namespace) -> None:
    args.compile = args.compile or args.compile_mode is not None
    check_bench_args(args)
    device = resolve_device(args.device)
    # counting times nothing, and a heap that keeps freed memory grows with each batch size counted (24 GB peak
    # for --count-batches 1 8 32 at ViT-B 512, against 6.5 GB with the system allocator)
    kept = not args.count_ops and set_allocator(args)
    torch.manual_seed(0)
    model, images, fractions = bench_model(args)
    # torch's own linear when compiling (inductor compiles its own) or counting (as a GPU runs it: no oneDNN packing)
    linear = use_linear_kernel(model, "aten" if args.compile or args.count_ops else args.linear, device)
    if args.compile:
        # dense and DToP share the compiled blocks: realised against compiled dense
        model.to(device).compile(**({"mode": args.compile_mode} if args.compile_mode else {}))
    if args.paths:
        print("dtop bench: warning: --paths is deprecated; use --layouts", file=sys.stderr)
    first = default_layout(device)
    layouts = args.layouts or args.paths or [first] + [p for p in ("per_image", "packed", "padded") if p != first]
    if args.count_ops:
        return report_op_counts(args, model.to(device).eval(), layouts)
    result = run_bench(model, images, args.batch, layouts, device, getattr(torch, args.dtype), args.warmup,
                       args.repeats, fractions, bucket=args.bucket)
    result.update(model=args.checkpoint or args.name, allocator="keep" if kept else "system", linear=linear,
                  compiled=bool(args.compile), compile_mode=args.compile_mode)
    if args.json:
        print(dumps(result))
        return
    print_bench_table(result)


FIXED_COST_NOTE = ("note: a realised share below 0 means DToP took longer than dense although it ran fewer FLOPs: "
                   "small models and inputs are bound by fixed costs per call (Python, op dispatch, the auxiliary "
                   "heads, gathering and scattering tokens) that exits do not cut; the FLOP saving shows on "
                   "large ones (e.g. segvit_vit_b16 at 512 x 512)")


def print_bench_table(result: dict[str, Any]) -> None:
    """The human-readable report of :func:`run_bench`'s ``result``: the setting, then one row per layout with
    each time ratio's [min, max] over the repeats, and :data:`FIXED_COST_NOTE` under the table when a
    realised share is below 0."""
    print(f"{result['model']} at {result['size'][0]}x{result['size'][1]}, batch {result['batch']}, {result['device']}, "
          f"{result['dtype']}, {result['threads']} threads, allocator {result['allocator']}, linear {result['linear']}"
          f"{', compiled' if result['compiled'] else ''}")
    print(f"GFLOPs/image: dense {result['gflops_dense']}, DToP {result['gflops_dtop']} "
          f"(ratio {result['flop_ratio']}); share of each image's tokens leaving early {result['exit_fractions']}")
    print(f"peak memory (mixed batch): dense {result['peak_mem_dense_mb']} MB")
    print(f"| layout | time ratio b1 [min, max of {result.get('repeats', '?')} repeats] | time ratio mixed [min, max] | "
          f"realised b1 | realised mixed | peak MB |")
    print("|---|---|---|---|---|---|")
    for p, e in result["layouts"].items():
        print(f"| {p} | {_spread_cell(e, 'batch1')} | {_spread_cell(e, 'mixed')} | {_cell(e['realised_batch1'])} | "
              f"{_cell(e['realised_mixed'])} | {e['peak_mem_dtop_mb']} |")
    realised_values = [e[k] for e in result["layouts"].values() for k in ("realised_batch1", "realised_mixed")]
    if any(isinstance(v, (int, float)) and v < 0 for v in realised_values):
        print(FIXED_COST_NOTE)
    if not any(result.get("exit_fractions") or [0]):
        print("note: no token exited early in these images (p0 too high for these heads, or a dense-trained "
              "checkpoint): DToP only added its auxiliary heads; try a lower --p0 or budget exits (--exit-ratio)")
    elif isinstance(result.get("flop_ratio"), (int, float)) and result["flop_ratio"] >= 1:
        print("note: DToP ran more GFLOPs than dense: its auxiliary heads cost more than the exits saved at this "
              "size and number of classes (realised shares are n/a without a FLOP saving)")


def _spread_cell(entry: dict[str, Any], which: str) -> str:
    """A time ratio with the [min, max] of its repeats (when the entry has them)."""
    value, spread = entry[f"time_ratio_{which}"], entry.get(f"time_ratio_{which}_range")
    return f"{value} [{spread[0]}, {spread[1]}]" if spread else str(value)


def report_op_counts(args: argparse.Namespace, model, layouts: Sequence[str]) -> None:
    if not isinstance(model, DToPSegmentor):
        raise ConfigError("--count-ops counts DToP's early-exit forward; this model runs a token reduction")
    counts = count_forward_ops(model, tuple(args.size), args.count_batches, layouts, args.exit_fractions)
    result = {"model": args.checkpoint or args.name, "size": list(args.size), "counts": counts,
              "exit_fractions": args.exit_fractions or "spread 0.3 ... 0.9 across each batch"}
    if args.json:
        print(dumps(result))
        return
    print(f"{result['model']} at {args.size[0]}x{args.size[1]}: operations dispatched per forward (each compute "
          f"kernel is a launch on CUDA), host syncs; forced exits at the first exit stage: "
          f"{result['exit_fractions']}. Batch 1 runs torch's batch-1 linear (a few ops fewer for dense and DToP).")
    print_op_counts(counts)


def _cell(v: Any) -> str:
    """A table cell: ``n/a`` for an undefined figure (None, NaN: no FLOP saving to realise)."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


APP = App("bench", "wall-clock dense vs DToP: batch-1 latency, mixed-batch throughput, memory", add_arguments, run)
