"""The dtop command line, run as a user runs it."""
import json
import subprocess
import sys

import pytest

from dtop.cli import main


def test_flops_json(capsys):
    assert main(["flops", "segmenter_vit_b16", "--size", "512", "512", "--num-classes", "150",
                 "--final-head-only", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["gflops"] - 129.6) / 129.6 < 0.005
    assert main(["flops", "segvit_vit_b16", "--size", "512", "512", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["gflops"] - 109.9) / 109.9 < 0.005


def test_unknown_preset_is_a_one_line_error(capsys):
    assert main(["flops", "vit_huge_dtop"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'vit_huge_dtop'" in err and "Traceback" not in err


def test_console_script_demo_prints_paper_table():
    proc = subprocess.run([sys.executable, "-m", "dtop", "paper-table", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 7 and all(abs(r["diff_pct"]) < 0.5 for r in rows)


@pytest.mark.parametrize("argv", [["models"]])
def test_models_lists_presets(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("segmenter_vit_s16", "segmenter_vit_b16", "segmenter_vit_l16", "segvit_vit_b16", "segvit_vit_l16",
                 "segvit_vit_t16", "segmenter_vit_t16"):
        assert name in out
