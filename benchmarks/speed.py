"""Wall-clock speed of DToP vs dense on this machine's CPU; writes the "Speed" section of RESULTS.md.

    python benchmarks/speed.py [--quick] [--runs 3] [--camvid-checkpoint runs/camvid/dtop/last.pt]

Each row is one `dtop bench` run (printed), which alternates dense and DToP calls in one process. The main
ViT-B/16 per_image measurement is repeated in ``--runs`` separate processes to show how far one run can be
trusted on a noisy machine.
GPU rows come from JSON files the device check (benchmarks/gpu_run.sh) wrote into benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section  # noqa: E402

from dtop.apps.bench import realised  # noqa: E402

SPREAD = ["0.3", "0.39", "0.47", "0.56", "0.64", "0.73", "0.81", "0.9"]


def bench(args: list[str]) -> tuple[str, dict]:
    cmd = ["dtop", "bench", *args, "--json"]
    print("+", shlex.join(cmd), flush=True)
    out = subprocess.run([sys.executable, "-m", "dtop", *cmd[1:]], check=True, cwd=ROOT, capture_output=True,
                         text=True).stdout
    line = out.strip().splitlines()[-1]
    print(line, flush=True)  # each bench's result in the log as it comes: a later failure loses nothing
    return shlex.join(cmd), json.loads(line)


def rows(cmd: str, r: dict, label: str) -> list[str]:
    out = []
    for layout, e in r.get("layouts", r.get("paths", {})).items():  # "paths": the older name, in older JSON files
        out.append(f"| {label} | {r['device']} {r['dtype']} | {layout} | {_ratios(r)} | "
                   f"{e['time_ratio_batch1']:.3f} | {e['time_ratio_mixed']:.3f} | {_f(e['realised_batch1'])} | "
                   f"{_f(e['realised_mixed'])} | {r['peak_mem_dense_mb']:.0f} / {e['peak_mem_dtop_mb']:.0f} |")
    return out


def _ratios(r: dict) -> str:
    b1 = r.get("flop_ratio_batch1")  # older JSON files have only the mixed-batch figure
    return f"{r['flop_ratio']:.3f}" if b1 is None or abs(b1 - r["flop_ratio"]) < 5e-4 else \
        f"{b1:.3f} / {r['flop_ratio']:.3f}"


def _per_image(results: dict, label: str) -> dict:
    """The per_image entry of the first run whose label starts with ``label``."""
    return next(r for lab, r in results.items() if lab.startswith(label))["layouts"]["per_image"]


def _ms(results: dict, label: str, side: str) -> str:
    """Batch-1 ms per image of the per_image layout (``side``: dense or dtop)."""
    return f"{_per_image(results, label)[f'{side}_ms_per_image_batch1']:.0f}"


def _f(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.2f}"  # NaN or null when nothing exits (nothing to realise)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--runs", type=int, default=3, help="separate runs of the main per_image measurement")
    ap.add_argument("--camvid-checkpoint", default="runs/camvid/dtop/last.pt")
    ap.add_argument("--camvid-images", default="../shared/data/camvid/val", help="relative to the repository root")
    a = ap.parse_args()
    rep = ["--warmup", "1", "--repeats", "2" if a.quick else "6"]  # even: each order of a pair equally often
    table = ["| model, exit pattern | device | layout | FLOP ratio (batch 1 / mixed) | time ratio batch 1 | time ratio mixed batch |"
             " realised batch 1 | realised mixed | peak MB dense / DToP |", "|---|---|---|---|---|---|---|---|---|"]
    commands = []
    b16 = ["segvit_vit_b16", "--size", "512", "512", "--batch", "8"]
    spread = [*b16, "--exit-fractions", *SPREAD, *rep]
    runs = [
        ("ViT-B/16 512, 8 images leaving 30..90% at block 6", spread),
        ("the same, torch's default linear kernel (aten)", [*spread, "--layouts", "per_image", "--linear", "aten"]),
        ("the same, C library's default allocator", [*spread, "--layouts", "per_image", "--allocator", "system"]),
        ("ViT-B/16 512, p0 1: nothing can leave (overhead)", [*b16, "--p0", "1", "--layouts", "per_image", *rep]),
        ("ViT-B/16 512, heads run but nothing leaves", [*b16, "--exit-fractions", "0", "--layouts", "per_image", *rep]),
    ]
    if (ROOT / a.camvid_checkpoint).is_file() and (ROOT / a.camvid_images).is_dir():
        runs.append(("CamVid ViT-T (trained), real val images, p0 0.9",
                     ["--checkpoint", a.camvid_checkpoint, "--images", a.camvid_images, "--p0", "0.9", "--size", "240",
                      "320", "--batch", "8", "--warmup", "2", "--repeats", "3" if a.quick else "10"]))
    main_runs, runs_by_label = [], {}
    for label, args in runs:
        cmd, r = bench(args)
        runs_by_label[label] = r
        commands.append(cmd)
        table += rows(cmd, r, label)
        if args is spread:
            main_runs.append(r["layouts"]["per_image"])
        print(label, "exit fractions", r["exit_fractions"], flush=True)
    repeat = [*spread, "--layouts", "per_image"]
    for _ in range(a.runs - 1):
        cmd, r = bench(repeat)
        main_runs.append(r["layouts"]["per_image"])
    if a.runs > 1:
        commands.append(f"{cmd}  # {a.runs - 1} more time(s)")
    spread_lines = [f"| {k.replace('_', ' ')} | " + " | ".join(f"{e[k]:.3f}" for e in main_runs) +
                    f" | {statistics.median(e[k] for e in main_runs):.3f} |"
                    for k in ("time_ratio_batch1", "realised_batch1", "time_ratio_mixed", "realised_mixed")]
    repeat_table = ["| ViT-B/16 512, 30..90% leaving, per_image | " + " | ".join(f"run {i + 1}" for i in
                                                                          range(len(main_runs))) + " | median |",
                    "|---" * (len(main_runs) + 2) + "|", *spread_lines]
    per_image = ["| exit fraction | FLOP ratio | time ratio | realised |", "|---|---|---|---|",
                 *(f"| {i['exit_fraction']:.2f} | {i['flop_ratio']:.3f} | {i['time_ratio']:.3f} | "
                   f"{_f(realised(i['time_ratio'], i['flop_ratio']))} |" for i in main_runs[0]["batch1_images"])]
    for f in sorted((ROOT / "benchmarks" / "results").glob("h200_bench_*.json")):
        r = json.loads(f.read_text())
        table += rows("", r, f"ViT-B/16 512, batch {r['batch']}, exits {min(r['exit_fractions']):.0%}.."
                             f"{max(r['exit_fractions']):.0%} ({f.name})")
    aten = _per_image(runs_by_label, "the same, torch")["realised_batch1"]
    onednn = _per_image(runs_by_label, "ViT-B/16 512, 8")["realised_batch1"]
    cpu = subprocess.getoutput("lscpu | grep 'Model name' | cut -d: -f2").strip()
    body = [
        f"CPU rows: {cpu or platform.processor()}, {subprocess.getoutput('nproc')} cores, fp32, measured by "
        "`python benchmarks/speed.py`, which ran:", "", "```bash", *commands, "```", "",
        "Time ratio = DToP time / dense time, each the sum over inputs of the median of `--repeats` calls (after a "
        "warm-up, dense and DToP run back to back on each input); realised = "
        "(1 - time ratio) / (1 - FLOP ratio). The dense model is the plain segmentor (final head only); DToP "
        "counts its auxiliary heads. Forced exit patterns pick random tokens at the first exit stage; the "
        "trained CamVid row prunes real images. `per_image` is the authors' layout (a Python loop over the "
        "images of a batch); `packed` and `padded` are the batched layouts. Peak memory on CPU is the peak of the tensor "
        "storage the forward allocates (TorchDispatchMode; weights and inputs are not counted: before commit "
        "0fd4052 views of the weights were, which charged DToP's extra head weights as activations), on CUDA "
        "`max_memory_allocated` (weights included, so DToP's auxiliary heads add their weights there).", "",
        *table, "",
        "`--allocator keep` (the default of `dtop bench` and `dtop predict`) stops glibc from handing freed blocks "
        "back to the OS after each forward and faulting them in again on the next (the 150-class 512x512 score "
        "map alone is 157 MB; `tests/test_bench.py` checks that the faults stop). Dense batch 1 took "
        f"{_ms(runs_by_label, 'the same, C library', 'dense')} ms per image with the C library's defaults and "
        f"{_ms(runs_by_label, 'ViT-B/16 512, 8', 'dense')} ms with keep in this run; those two rows ran minutes "
        "apart in separate processes, so machine drift is in that difference, while each row's ratios compare "
        "dense and DToP side by side.", "",
        "`--linear auto` (the default of `dtop bench` and `dtop predict`, every CPU row but the aten one) "
        "multiplies by weights packed once for oneDNN instead of torch's default MKL sgemm, which repacks each "
        "weight on every call (`dtop/models/packed.py`). Both models use the same kernel in a row. Dense batch 1 "
        f"took {_ms(runs_by_label, 'the same, torch', 'dense')} ms per image with aten and "
        f"{_ms(runs_by_label, 'ViT-B/16 512, 8', 'dense')} ms with oneDNN (separate processes); batch-1 realised "
        f"{_f(aten)} with aten against {_f(onednn)} with oneDNN" + (
            ": the repacking is a cost per call that does not shrink when tokens leave "
            "(`benchmarks/block_scaling.py`)." if aten < onednn else "."), "",
        "Nothing leaving, two ways: with `--p0 1` no token can pass the threshold, so the forward skips the "
        "auxiliary heads (the issue's overhead case); with `--exit-fractions 0` the heads run and decide, and "
        "no token leaves (their FLOPs are in the FLOP ratio).", "",
        (f"The same ViT-B/16 per_image measurement in {len(main_runs)} separate processes (the first is the "
         "table's row), to show the spread between runs on this machine:" if len(main_runs) > 1 else
         "The ViT-B/16 per_image measurement of the table (one run: `--runs 3` repeats it in separate processes "
         "to show the spread between runs):"), "", *repeat_table, "",
        "Each image of the first run alone (batch 1, per_image); `python benchmarks/block_scaling.py` (its own "
        "section) separates the blocks' share of the loss from the fixed costs:", "", *per_image, "",
        "H200 rows come from `benchmarks/gpu_run.sh` on a lent H200 (torch 2.11, JSON in `benchmarks/results/`), "
        "run before commit 681632b removed per-block host syncs and the per-image Python GFLOPs loop, and with the "
        "earlier bench that gave every image run alone the first exit fraction (0.3), so their batch-1 columns "
        "compare unlike FLOPs; the mixed-batch columns stand. No GPU was available to re-measure after those "
        "changes. On the H200 every DToP layout was slower than dense at batch 8: the forward is bound by kernel "
        "launches there (dense bf16 batch 8 takes about 7.6 ms), and the stage heads and bookkeeping add launches. "
        "No GPU has been lent since issue 15 cut what DToP dispatches (packed 1.29x dense's operations, one host "
        "sync per exit stage: the op-count section); `benchmarks/gpu_run.sh` is the check to run when one is.",
    ]
    replace_section("Speed: wall-clock dense vs DToP", "\n".join(body))
    print("\n".join(table))


if __name__ == "__main__":
    main()
