"""The benchmark's measuring tools (not timings: those live in benchmarks/RESULTS.md)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from dtop.apps.bench import (FIXED_COST_NOTE, PeakTensorMemory, Timing, alternate, forced_exits, print_bench_table,
                             run_bench)
from dtop.cli import main


def test_forced_exits_hit_the_requested_fractions():
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[2, 30:] = False
    exits = forced_exits([0.1, 0.5, 0.5])(0, torch.rand(3, 40), valid)
    assert exits.sum(1).tolist() == [4, 20, 15]
    assert not (exits & ~valid).any()
    assert not forced_exits([0.5])(1, torch.rand(1, 8), torch.ones(1, 8, dtype=torch.bool)).any()


def test_alternate_pairs_each_input_back_to_back():
    log = []
    dense = [lambda i=i: log.append(("dense", i)) for i in range(3)]
    dtop = [lambda i=i: log.append(("dtop", i)) for i in range(3)]
    t = alternate(dense, dtop, torch.device("cpu"), warmup=1, repeats=2)
    pairs = [("dense", 0), ("dtop", 0), ("dense", 1), ("dtop", 1), ("dense", 2), ("dtop", 2)]
    swapped = [("dtop", 0), ("dense", 0), ("dtop", 1), ("dense", 1), ("dtop", 2), ("dense", 2)]
    assert log == pairs * 2 + swapped  # warm-up, then two timed rounds, the second with each pair swapped
    assert [len(x) for x in t.dense + t.dtop] == [2] * 6


def test_timing_ratio_sums_per_input_medians():
    t = Timing(dense=[[1.0, 9.0, 1.2], [2.0, 2.0, 2.2]], dtop=[[0.5, 0.6, 5.0], [1.0, 1.1, 1.0]])
    assert t.total("dense") == 1.2 + 2.0 and t.total("dtop") == 0.6 + 1.0  # outliers (9.0, 5.0) drop out
    assert abs(t.ratio() - 1.6 / 3.2) < 1e-12


def test_timing_spread_is_the_range_of_each_repeats_own_ratio():
    t = Timing(dense=[[1.0, 2.0, 1.0], [1.0, 2.0, 3.0]], dtop=[[0.5, 1.8, 0.9], [0.7, 1.0, 2.1]])
    assert t.repeat_ratios() == pytest.approx([1.2 / 2.0, 2.8 / 4.0, 3.0 / 4.0])
    assert t.ratio_range() == pytest.approx([0.6, 0.75])


def test_run_bench_reports_the_spread_of_its_repeats():
    model = tiny_model(("atm", "atm", "atm"))
    r = run_bench(model, torch.randn(2, 3, 64, 96), 2, ["per_image"], torch.device("cpu"), warmup=0, repeats=3,
                  exit_fractions=[0.6, 0.8])
    assert r["flop_ratio"] < 1 and r["flop_ratio_batch1"] < 1
    assert r["repeats"] == 3
    for entry in (r, r["layouts"]["per_image"]):
        for which in ("batch1", "mixed"):
            lo, hi = entry[f"time_ratio_{which}_range"]
            assert 0 < lo <= hi
            rlo, rhi = entry[f"realised_{which}_range"]
            assert rlo <= rhi  # the slowest repeat realises the least
            flop_ratio = r["flop_ratio" if which == "mixed" else "flop_ratio_batch1"]
            assert rhi == pytest.approx((1 - lo) / (1 - flop_ratio), abs=2e-3)


def bench_result(realised_b1, realised_mixed):
    """A result as run_bench and the CLI make it (no timing: the figures are made up)."""
    layout = {"time_ratio_batch1": 1.05, "time_ratio_mixed": 0.9, "realised_batch1": realised_b1,
              "realised_mixed": realised_mixed, "time_ratio_batch1_range": [0.98, 1.12],
              "time_ratio_mixed_range": [0.85, 0.93], "peak_mem_dtop_mb": 3.5}
    return {"model": "segvit_vit_t16", "size": [32, 48], "batch": 2, "device": "cpu", "dtype": "float32",
            "threads": 1, "allocator": "system", "linear": "aten", "compiled": False, "gflops_dense": 0.01,
            "gflops_dtop": 0.009, "flop_ratio": 0.9, "exit_fractions": [0.3, 0.6], "peak_mem_dense_mb": 4.0,
            "repeats": 5, "layouts": {"per_image": layout}}


def test_bench_table_shows_the_spread_and_explains_a_negative_realised_share(capsys):
    print_bench_table(bench_result(-0.5, 1.0))
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| per_image |"))
    assert "1.05 [0.98, 1.12]" in row and "0.9 [0.85, 0.93]" in row and "| -0.5 |" in row
    assert "5 repeats" in out
    assert out.rstrip().splitlines()[-1] == FIXED_COST_NOTE and "fixed costs" in FIXED_COST_NOTE
    print_bench_table(bench_result(0.4, float("nan")))  # no negative share (an undefined one is not): no note
    out = capsys.readouterr().out
    assert FIXED_COST_NOTE not in out and "| n/a |" in out


def test_peak_tensor_memory_sees_live_tensors():
    with PeakTensorMemory() as mode:
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 4 MiB more, both alive
        del a, b
        c = torch.ones(256, 1024)  # 1 MiB after the others are freed
    assert 8 * 2 ** 20 <= mode.peak < 9 * 2 ** 20
    assert c.shape == (256, 1024)


def test_peak_tensor_memory_ignores_tensors_made_before_it():
    layer = torch.nn.Linear(1024, 1024)  # a 4 MiB weight; F.linear takes a view of it (weight.t())
    x = torch.ones(4, 1024)
    with PeakTensorMemory() as mode:
        y = layer(x)  # 16 KiB new
        y.add_(1)  # in place: nothing new
    assert mode.peak == y.untyped_storage().nbytes() == 4 * 1024 * 4


def test_run_bench_reports_every_field():
    model = tiny_model(("atm", "atm", "atm"))
    images = torch.randn(4, 3, 64, 96)
    r = run_bench(model, images, 4, ["per_image", "packed"], torch.device("cpu"), warmup=0, repeats=1,
                  exit_fractions=[0.2, 0.4, 0.6, 0.8])
    for key in ("flop_ratio", "time_ratio_batch1", "time_ratio_mixed", "realised_batch1", "realised_mixed",
                "peak_mem_dense_mb", "peak_mem_dtop_mb", "device"):
        assert key in r, key
    assert r["exit_fractions"] == [0.208, 0.417, 0.583, 0.792]  # of 24 tokens: 5, 10, 14, 19
    alone = r["paths"]["per_image"]["batch1_images"]
    assert [a["exit_fraction"] for a in alone] == r["exit_fractions"]  # each image keeps its pattern alone
    assert [a["flop_ratio"] for a in alone] == sorted(a["flop_ratio"] for a in alone)[::-1]  # more exits, fewer FLOPs
    assert abs(sum(a["flop_ratio"] for a in alone) / 4 - r["flop_ratio_batch1"]) < 1e-3
    assert 0 < r["flop_ratio"] < 1 and set(r["paths"]) == {"per_image", "packed"}
    assert model.force_exit is None  # the override does not outlive the benchmark


def test_bench_cli_json(capsys):
    assert main(["bench", "segvit_vit_t16", "--size", "32", "48", "--batch", "2", "--num-classes", "3",
                 "--warmup", "0", "--repeats", "1", "--paths", "padded", "--json", "--allocator", "system"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["allocator"] == "system" and r["linear"] in ("onednn", "aten")  # auto on CPU
    assert r["path"] == "padded" and r["batch"] == 2 and r["gflops_dtop"] < r["gflops_dense"] * 1.5


FAULTS = """
import resource, sys, torch
from dtop.engine.common import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # 64 MiB: with keep, the heap grows during the first (aligned) allocations
    x = torch.ones(16 * 2 ** 20); del x
before = faults()
for _ in range(3):
    x = torch.ones(16 * 2 ** 20); del x
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_stops_refaulting_big_blocks():
    """A freed 64 MiB tensor is faulted in again on every allocation with glibc's defaults (16384 pages
    of 4 KiB each time); with keep_freed_memory the same memory serves the next allocation."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert faults("system") > 3 * 4000  # hugepages could cut this; 3 x 16384 with 4 KiB pages
    assert faults("keep") < 1000


def test_bench_cli_p0_one_skips_the_auxiliary_heads(capsys):
    """--p0 1 without a checkpoint: nothing can exit, so DToP runs the dense model's FLOPs exactly."""
    assert main(["bench", "segvit_vit_t16", "--size", "32", "48", "--batch", "2", "--num-classes", "3",
                 "--warmup", "0", "--repeats", "1", "--paths", "per_image", "--p0", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["flop_ratio"] == 1.0 and r["gflops_dtop"] == r["gflops_dense"]
    assert r["exit_fractions"] == [0.0, 0.0] and r["realised_batch1"] is None  # undefined: null, not NaN
