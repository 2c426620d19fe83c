"""torch.compile on this CPU: DToP against the compiled dense model, and compiled DToP against eager DToP,
side by side in one process; writes its RESULTS.md section.

    python benchmarks/compiled_speed.py [--model segvit_vit_b16] [--size 512 512] [--batch 8] [--repeats 5]

Two copies of one model with the same weights: one eager, one through ``model.compile()`` (dynamic shapes;
torch's own linear in both, since inductor compiles its own). The mixed batch gets forced exit fractions
spread 0.3 ... 0.9 at the first exit stage. For each layout, two timings alternate call by call
(``dtop.apps.bench.alternate``): compiled dense vs compiled DToP (the realised fraction against the compiled
dense model) and eager DToP vs compiled DToP. Also: the graphs compiled over 20 batches of random exit patterns.
"""
from __future__ import annotations

import argparse
import copy
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section  # noqa: E402

from dtop import create_model  # noqa: E402
from dtop.apps.bench import alternate, forced_exits, realised, spread  # noqa: E402
from dtop.flops import dense_flops, forward_gflops  # noqa: E402
from dtop.models.packed import use_linear_kernel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="segvit_vit_b16")
    ap.add_argument("--size", nargs=2, type=int, default=[512, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layouts", nargs="+", default=["per_image", "packed"])
    args = ap.parse_args()
    torch.manual_seed(0)
    eager = create_model(args.model, num_classes=150, p0=0.5).eval()
    use_linear_kernel(eager, "aten")
    compiled = copy.deepcopy(eager)
    t0 = time.time()
    compiled.compile()
    x = torch.randn(args.batch, 3, *args.size)
    for m in (eager, compiled):
        m.force_exit = forced_exits(spread(args.batch))
    with torch.no_grad():
        out = eager(x)
        flop_ratio = float(forward_gflops(eager, out).mean()) / (dense_flops(eager, tuple(args.size), True) / 1e9)
        rows, graphs = [], {}
        for layout in args.layouts:
            eager.set_layout(layout)
            compiled.set_layout(layout)
            dense_c, dtop_c, dtop_e = (lambda: compiled.forward_dense(x)), (lambda: compiled(x)), (lambda: eager(x))
            dtop_c()
            dense_c()  # first calls compile: not timed
            vs_dense = alternate([dense_c], [dtop_c], torch.device("cpu"), 1, args.repeats)
            vs_eager = alternate([dtop_e], [dtop_c], torch.device("cpu"), 1, args.repeats)
            rows.append((layout, vs_dense.ratio(), vs_eager.ratio(), vs_dense.total("dense"), vs_dense.total("dtop"),
                         vs_eager.total("dense")))
            before = counters["stats"]["unique_graphs"]
            gen = torch.Generator().manual_seed(1)
            for i in range(20):
                compiled.force_exit = forced_exits(torch.rand(args.batch, generator=gen).tolist(), seed=i)
                compiled(x)
            compiled.force_exit = forced_exits(spread(args.batch))
            graphs[layout] = counters["stats"]["unique_graphs"] - before
    minutes = (time.time() - t0) / 60
    cmd = f"python benchmarks/compiled_speed.py --model {args.model} --size {args.size[0]} {args.size[1]} " \
          f"--batch {args.batch} --repeats {args.repeats} --layouts {' '.join(args.layouts)}"
    lines = [f"Command: `{cmd}` ({minutes:.0f} min). {platform.machine()} CPU, {subprocess.getoutput('nproc')} cores, "
             f"torch {torch.__version__}, fp32, inductor; mixed batch of {args.batch} at {args.size[0]} x {args.size[1]}, "
             f"forced exits 0.3 ... 0.9 at the first exit stage: FLOP ratio {flop_ratio:.3f}.", "",
             "| layout | compiled DToP / compiled dense (time) | realised vs compiled dense | compiled DToP / eager DToP "
             "(time) | s per batch: compiled dense / compiled DToP (first pair), eager DToP (second pair) | new graphs over 20 random exit "
             "patterns |", "|---|---|---|---|---|---|"]
    for layout, r_dense, r_eager, t_dense, t_dtop, t_eager in rows:
        lines.append(f"| {layout} | {r_dense:.3f} | {realised(r_dense, flop_ratio):.2f} | {r_eager:.3f} | "
                     f"{t_dense:.2f} / {t_dtop:.2f} / {t_eager:.2f} | {graphs[layout]} |")
    body = "\n".join(lines)
    replace_section("torch.compile on CPU: DToP vs compiled dense", body)
    print(body)
    print("+", shlex.join(sys.argv))


if __name__ == "__main__":
    main()
