"""Install and discoverability: ``dtop --version``, ``dtop config``, and the README's "Datasets" and
"Load a trained checkpoint in Python" sections, run against the code they describe."""
import dataclasses
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dtop
from conftest import tiny_model
from dtop._version import __version__
from dtop.apps.config_show import HELP, format_value
from dtop.cli import APPS, main
from dtop.config import ExperimentConfig, load_config
from dtop.data import DATASETS, build_dataset

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- --version
def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"dtop {__version__}"
    assert dtop.__version__ == __version__ == metadata.version("dtop")  # the package and pyproject.toml agree


def test_console_script_version():
    script = Path(sys.executable).with_name("dtop")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dtop"]
    proc = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"dtop {__version__}"


# ---------------------------------------------------------------------------------------------- dtop config
def all_keys() -> list[str]:
    """``section.field`` of every field of every dataclass section of ExperimentConfig, then ``out_dir``."""
    keys = []
    for f in dataclasses.fields(ExperimentConfig):
        section = getattr(ExperimentConfig(), f.name)
        if dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
        else:
            keys.append(f.name)
    return keys


LINE = re.compile(r"^(?P<key>[a-z_]+(?:\.[a-z_0-9]+)?) = (?P<value>.*?)(?: +# (?P<help>.*))?$")


def shown(out: str) -> dict[str, tuple[str, str]]:
    """key -> (value text, help) of each ``key = value  # help`` line; the first line is a comment."""
    lines = out.splitlines()
    assert lines[0].startswith("# dtop config")
    rows = {}
    for line in lines[1:]:
        if line:
            m = LINE.match(line)
            assert m, line
            rows[m["key"]] = (m["value"], m["help"] or "")
    return rows


def flat(cfg: ExperimentConfig) -> dict:
    d = cfg.to_dict()
    return {k: (d[k.split(".")[0]][k.split(".")[1]] if "." in k else d[k]) for k in all_keys()}


def test_config_app_is_registered():
    assert "config" in [app.name for app in APPS]


def test_config_lists_every_key_of_every_section_with_its_default_and_help(capsys):
    assert main(["config"]) == 0
    rows = shown(capsys.readouterr().out)
    keys = all_keys()
    assert list(rows) == keys  # every field of model, data, train, eval, then out_dir, in order
    assert {k.split(".")[0] for k in keys} == {"model", "data", "train", "eval", "out_dir"}
    assert set(HELP) == set(keys)  # a help line for every key, none for keys that are gone
    defaults = flat(ExperimentConfig())
    for key, (value, help_) in rows.items():
        assert yaml.safe_load(value) == defaults[key], key  # the value as --set reads it
        assert help_ and "(default" not in help_, key


def test_config_show_file_marks_changes_and_round_trips_through_set(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": "runs/x",
        "model": {"preset": "segvit_vit_b16", "overrides": {"stages": [{"block": 1, "head": "linear"}]}},
        "data": {"name": "camvid", "root": "/data/camvid", "crop_size": [240, 320], "mean": [0.4, 0.5, 0.6]},
        "train": {"lr": 5.0e-5, "p0": [0.8, 0.9], "grad_clip": 1.0}}))
    sets = ["--set", "eval.p0=[0.8,0.95]", "--set", "data.options.label_mode=rgb"]
    assert main(["config", "--show", str(path), *sets]) == 0
    out = capsys.readouterr().out
    assert main(["config", str(path), *sets]) == 0  # the positional form says the same
    assert capsys.readouterr().out == out
    rows = shown(out)
    assert list(rows) == all_keys()
    assert rows["data.name"][0] == "camvid" and rows["data.name"][1].endswith("(default synthetic)")
    assert rows["eval.p0"][0] == "[0.8, 0.95]" and "(default [0.9])" in rows["eval.p0"][1]
    assert rows["train.grad_clip"][1].endswith("(default null)")
    assert "(default" not in rows["train.iters"][1]  # unchanged keys only their help
    # every printed value, fed back through --set, gives the same config
    expected = load_config(path, [s for s in sets if s != "--set"])
    again = load_config(None, [f"{k}={v}" for k, (v, _) in rows.items()])
    assert again.to_dict() == expected.to_dict()
    assert main(["config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == load_config(path).to_dict()


def test_config_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["config", str(path), "--show", str(tmp_path / "other.yaml")]) == 2


@pytest.mark.parametrize("value,text", [("synthetic", "synthetic"), ("runs/x", "runs/x"), ("true", '"true"'),
                                        ("null", '"null"'), ("", '""'), ("12", '"12"'), (None, "null"),
                                        (False, "false"), ([128, 192], "[128, 192]"), ({}, "{}"), (0.001, "0.001")])
def test_values_are_written_as_set_reads_them(value, text):
    assert format_value(value) == text
    assert yaml.safe_load(text) == value


# ---------------------------------------------------------------------------------------------- README
def readme_section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.index("\n#", start + len(title) + 2)
    return README[start:end]


def readme_layout(name: str) -> list[str]:
    """The backticked paths of ``name``'s row in the README's dataset table (its last cell)."""
    row = next(line for line in readme_section("### Datasets").splitlines() if line.startswith(f"| `{name}` |"))
    return [p for p in re.findall(r"`([^`]+)`", row.rstrip(" |").rsplit(" | ", 1)[1]) if "/" in p]


NAMED = sorted(n for n, cls in DATASETS.items() if getattr(cls, "meta_name", ""))


def test_readme_datasets_section_names_every_dataset_and_its_layout():
    text = readme_section("### Datasets")
    for name in DATASETS:
        if name != "synthetic":
            assert f"| `{name}` |" in text, name
    for name in NAMED:  # the layout each named dataset looks for, as its own error messages spell it
        layout = [w for w in DATASETS[name].LAYOUT.split() if "/" in w]
        assert layout and set(layout) <= set(readme_layout(name)), name


@pytest.mark.parametrize("name", NAMED)
def test_readme_dataset_layout_is_what_the_dataset_reads(name, tmp_path):
    """Files made where the README's table says (first split of each {a,b}, one image 'x') pair into a
    one-sample training split."""
    for pattern in readme_layout(name):
        rel = re.sub(r"\{([^,}]+)[^}]*\}", r"\1", pattern).replace("<city>", "aachen").replace("*", "x")
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".txt":
            path.write_text("x\n")
        elif path.suffix == ".jpg":
            Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(path)
        else:  # PNG: an image folder's reads as grey, a label folder's holds id 1
            Image.fromarray(np.full((8, 8), 1, np.uint8)).save(path)
    dataset = build_dataset(name, split="train", root=tmp_path)
    assert len(dataset) == 1


def test_readme_checkpoint_snippet_runs(tmp_path, capsys):
    block = readme_section("### Load a trained checkpoint in Python")
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    model = tiny_model(p0=0.6)
    ckpt = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                "config": ExperimentConfig().to_dict()}, ckpt)
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(photo)
    assert '"runs/camvid_dinov2/dtop/last.pt"' in code and '"photo.jpg"' in code
    code = code.replace('"runs/camvid_dinov2/dtop/last.pt"', repr(str(ckpt))).replace('"photo.jpg"', repr(str(photo)))
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    label = ns["label"]
    assert label.shape == (50, 70) and label.dtype == torch.long and 0 <= int(label.min()) <= int(label.max()) < 5
    assert ns["mean"] == (0.5, 0.5, 0.5)  # the default config's backbone (AugReg ViT): 0.5
    # the README's other way, dtop eval's predict on the unpadded image, gives the same labels
    from dtop.engine.evaluate import predict
    x, _ = ns["EvalTransform"](mean=ns["mean"], std=ns["std"])(ns["rgb"])
    pred = predict(ns["model"], x, ns["cfg"].eval)
    assert torch.equal(pred.label_map((50, 70)), label)
    assert "torch.Size([50, 70])" in capsys.readouterr().out
