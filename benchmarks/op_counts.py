"""What a GPU pays for per forward, counted on this CPU: dispatched operations, compute kernels (each a
launch on CUDA) and host synchronisations, for dense and DToP in each layout; writes its RESULTS.md section.

    python benchmarks/op_counts.py [--model segvit_vit_b16] [--size 512 512] [--batches 1 8 32]

One `dtop bench --count-ops` run (printed); forced exits spread 0.3 ... 0.9 across each batch at the first
exit stage, and p0 1 (nothing can leave). Counted with a dispatch mode (dtop/engine/opcount.py).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section  # noqa: E402


def target(counts: dict) -> str:
    """Issue 15's targets at batch 8 (packed <= 1.3x dense ops; p0 1 <= 1.02x), stated as met or missed."""
    row = counts.get("8")
    if not row or "packed" not in row:
        return ""
    packed, idle = row["packed"]["ops"] / row["dense"]["ops"], row["p0_1"]["ops"] / row["dense"]["ops"]
    return (f" Targets at batch 8: packed <= 1.3x dense ops: {packed:.2f}x ({'met' if packed <= 1.3 else 'missed'}); "
            f"p0 1 <= 1.02x: {idle:.3f}x ({'met' if idle <= 1.02 else 'missed'}).")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="segvit_vit_b16")
    ap.add_argument("--size", nargs=2, default=["512", "512"])
    ap.add_argument("--batches", nargs="+", default=["1", "8", "32"])
    args = ap.parse_args()
    cmd = ["dtop", "bench", args.model, "--size", *args.size, "--count-ops", "--count-batches", *args.batches]
    print("+", shlex.join(cmd), flush=True)
    out = subprocess.run([sys.executable, "-m", "dtop", *cmd[1:], "--json"], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    counts = json.loads(out.strip().splitlines()[-1])["counts"]
    lines = ["| batch | variant | ops | compute kernels | host syncs | ops vs dense | kernels vs dense |",
             "|---|---|---|---|---|---|---|"]
    for B, row in counts.items():
        for name, c in row.items():
            lines.append(f"| {B} | {name} | {c['ops']} | {c['kernels']} | {c['syncs']} "
                         f"({', '.join(f'{k} {v}' for k, v in c['sync_ops'].items()) or '-'}) | "
                         f"{c['ops'] / row['dense']['ops']:.2f} | {c['kernels'] / row['dense']['kernels']:.2f} |")
    big = [b for b in counts if b != "1"]
    growth = ""
    if len(big) >= 2:
        a, b = counts[big[0]]["packed"]["ops"], counts[big[-1]]["packed"]["ops"]
        growth = f" The packed layout's count at batch {big[-1]} is {b / a:.3f}x its count at batch {big[0]}."
    body = "\n".join([
        f"Command: `{shlex.join(cmd)}` (printed by `python benchmarks/op_counts.py`). Per forward, no autograd, "
        "torch's own linear (no oneDNN packing). `ops`: every aten operation dispatched; `compute kernels`: those "
        "that are not views (each is one launch on CUDA); host syncs: `.item()`/`tolist()`/`.cpu()` and "
        "data-dependent shapes (`nonzero`, ...); the two `cpu` syncs of every DToP forward are the output copies of "
        "`tokens_per_block` and `head_tokens`. `p0_1`: DToP where nothing can leave. The registered "
        "`dtop::varlen_attention` counts as one operation. The forced exit choice itself (the benchmark's "
        "harness) is not counted; the exit rule it overrides is." + growth + target(counts), "", *lines,
        "", "What DToP dispatches beyond dense (ViT-B, batch 8, counted per source line at the commit of this "
        "note): the two auxiliary ATM heads (one decoder layer each, about 55 ops apiece, their query side "
        "cached at inference and their attention one fused SDPA call), the key masks of the heads that decode a "
        "padded grid (5 ops each), the exit rule at each exit stage (confidence and the context rule: 17 ops, "
        "two stable sorts), packing the kept rows straight from the decode grid (about 21 ops per stage, its "
        "one host sync), the decode scatter (6 per stage) and the canvas writes (7 per stage) and exit marks "
        "(3); the packed blocks dispatch fewer ops than timm's Block (16 against 27: -66 over six blocks). The "
        "aux heads alone are over a quarter of dense's count, which puts the 1.3x target out of reach of eager "
        "dispatch for this model short of fusing the bookkeeping into custom kernels; torch.compile fuses its "
        "pointwise ops (section below). Before this round (fused ATM attention, one-compare context rank, "
        "packing from the grid, stage maps shaped on read) packed was 1.71x."])
    replace_section("Operations and host syncs per forward (what a GPU pays for)", body)
    print(body)


if __name__ == "__main__":
    main()
