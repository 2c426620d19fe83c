"""Bad input gets a clear error that names the problem."""
import re
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import dtop
from conftest import tiny_model
from dtop.checkpoint import check_and_load, load_state_dict_file
from dtop.errors import CheckpointError, ConfigError, InputError
from dtop.models import ViTBackbone


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("shape,match", [
    ((1, 1, 64, 64), "1 channels, the backbone expects 3"),
    ((1, 4, 64, 64), "4 channels"),
    ((64, 64), "4-D tensor"),
    ((1, 1, 3, 64, 64), "5-D"),
    ((1, 3, 60, 64), "60x64 is not a positive multiple of the patch size 16"),
    ((1, 3, 8, 8), "8x8"),
])
def test_bad_image_shapes(model, shape, match):
    with pytest.raises(InputError, match=match):
        model(torch.zeros(shape))
    with pytest.raises(InputError, match=match):
        model.forward_dense(torch.zeros(shape))


def test_non_float_and_non_tensor_input(model):
    with pytest.raises(InputError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError, match="torch.Tensor"):
        model([[0.0]])


def test_unknown_preset_and_config_errors():
    with pytest.raises(ConfigError, match="unknown model preset 'segvit_vit_b61'.*did you mean segvit_vit_b16"):
        dtop.create_model("segvit_vit_b61")
    with pytest.raises(ConfigError, match="unknown head type 'fcn'"):
        dtop.create_model("segvit_vit_t16", stages=[{"block": 11, "head": "fcn"}])
    with pytest.raises(ConfigError, match="blocks 0..3"):
        tiny_model(blocks=(1, 2, 7))
    with pytest.raises(ConfigError, match="strictly increasing"):
        tiny_model(blocks=(2, 1, 3))
    with pytest.raises(ConfigError, match="p0 has 3 values but the model has 2 non-final stages"):
        tiny_model(p0=[0.9, 0.9, 0.9])
    with pytest.raises(ConfigError, match="unknown model config keys: colour"):
        dtop.get_config("segvit_vit_t16", colour="red")
    with pytest.raises(ConfigError, match="unknown timm model"):
        ViTBackbone("vit_nonexistent_patch16")


def _timm_vit(img_size=224):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, depth=2, num_classes=10)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_pretrained_weights_load(tmp_path, suffix):
    vit = _timm_vit()
    path = tmp_path / f"vit{suffix}"
    state = vit.state_dict()  # includes the classifier head.*, which dtop ignores
    if suffix == ".pth":
        torch.save({"model": state}, path)
    else:
        save_file(state, str(path))
    bb = ViTBackbone("vit_tiny_patch16_224", pretrained=str(path), img_size=384, model_kwargs={"depth": 2})
    torch.testing.assert_close(bb.vit.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert bb.vit.pos_embed.shape[1] == 1 + 24 * 24  # resampled from 14x14 to the 384 grid


def test_pretrained_with_missing_or_unexpected_keys(tmp_path):
    state = _timm_vit().state_dict()
    state.pop("blocks.0.attn.qkv.weight")
    state["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.0.attn.qkv.weight; "
                                              r"unexpected keys \(1\): blocks.0.extra.weight"):
        ViTBackbone("vit_tiny_patch16_224", pretrained=str(path), model_kwargs={"depth": 2})


def test_model_checkpoint_mismatch_lists_keys(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    state.pop("heads.0.presence.weight")
    state["heads.9.fc.weight"] = torch.zeros(1)
    state["heads.1.query"] = torch.zeros(1, 3, 32)
    with pytest.raises(CheckpointError) as e:
        check_and_load(model, state, source="ckpt.pth")
    msg = str(e.value)
    assert "missing keys (1): heads.0.presence.weight" in msg
    assert "unexpected keys (1): heads.9.fc.weight" in msg
    assert "heads.1.query (1, 3, 32) vs model (1, 5, 32)" in msg


def test_checkpoint_files_missing_or_unsafe(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("this would run code",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_state_dict_file(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_state_dict_file(junk)


def test_hub_weights_offline_give_a_clear_error(monkeypatch):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="pass a local weight file instead"):
        ViTBackbone("vit_tiny_patch16_224", pretrained=True, model_kwargs={"depth": 1})


def test_config_values_are_checked_against_their_types():
    """``--set train.lr=5e-05`` is a string to YAML 1.1 (a float needs a dot): it is read as the number the
    user meant; a value of the wrong type is a ConfigError naming the key, not a TypeError deep in torch."""
    from dtop.config import load_config

    cfg = load_config(None, ["train.lr=5e-05", "train.iters=100.0", "train.p0=[0.8, 0.9]", "model.pretrained=true"])
    assert cfg.train.lr == 5e-05 and isinstance(cfg.train.lr, float)
    assert cfg.train.iters == 100 and isinstance(cfg.train.iters, int)
    assert cfg.train.p0 == [0.8, 0.9] and cfg.model.pretrained is True
    for bad, message in [("train.iters=abc", "train.iters must be an integer, got 'abc'"),
                         ("train.iters=2.5", "train.iters must be an integer"),
                         ("train.lr=fast", "train.lr must be a number"),
                         ("train.amp=3", "train.amp must be true or false"),
                         ("data.crop_size=5", "data.crop_size must be a list"),
                         ("data.crop_size=[240, x]", r"data.crop_size\[1\] must be an integer"),
                         ("train.p0=[0.9, x]", "train.p0: .* fits none of its types")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


def test_num_classes_of_the_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 1, got '11'"):
        dtop.create_model("segvit_vit_t16", num_classes="11")
    with pytest.raises(ConfigError, match="topk must be an integer"):
        dtop.create_model("segvit_vit_t16", num_classes=3, topk=1.5)


def test_reduction_given_as_text_builds_the_alternative():
    """create_model(..., reduction="avgpool") reads the text as --reduction does (was an AttributeError)."""
    from dtop.models import ReducedSegmentor

    m = dtop.create_model("segvit_vit_t16", num_classes=5, reduction="avgpool,block=1",
                          backbone_kwargs={"depth": 4, "embed_dim": 64, "num_heads": 2},
                          stages=[{"block": 1, "head": "linear"}, {"block": 3, "head": "linear"}])
    assert isinstance(m, ReducedSegmentor) and m.cfg.reduction.kind == "avgpool" and m.cfg.reduction.block == 1
    with pytest.raises(ConfigError, match="reduction"):
        dtop.create_model("segvit_vit_t16", num_classes=5, reduction="avgpoll")


@pytest.mark.parametrize("key", ["pretrained", "num_classes"])
def test_overrides_of_what_the_experiment_decides_are_refused(key):
    """--set model.overrides.pretrained=FILE was a TypeError (multiple values for 'pretrained')."""
    from dtop.config import config_from_dict
    from dtop.engine.common import experiment_model

    cfg = config_from_dict({"model": {"preset": "segvit_vit_t16", "overrides": {key: 3}}})
    with pytest.raises(ConfigError, match=f"model.overrides.{key}"):
        experiment_model(cfg, 5)


def test_bench_default_size_is_whole_patches_of_the_model():
    """dtop bench segvit_dinov2_s14 without --size refused its own default 512 x 512; now 518 x 518."""
    from dtop.apps.bench import bench_model
    from dtop.cli import build_parser

    args = build_parser().parse_args(["bench", "segvit_dinov2_s14", "--num-classes", "5", "--batch", "1"])
    _, images, _ = bench_model(args)
    assert tuple(images.shape[-2:]) == (518, 518) and args.size == [518, 518]


def test_set_reaches_into_free_form_sections():
    """--set model.overrides.backbone_kwargs.pretrained_grid=[15,20] was refused as an unknown key."""
    from dtop.config import load_config

    cfg = load_config(None, ["model.overrides.backbone_kwargs.pretrained_grid=[15, 20]",
                             "model.overrides.backbone_kwargs.drop_path_rate=0.1", "data.options.num_images=3"])
    assert cfg.model.overrides["backbone_kwargs"] == {"pretrained_grid": [15, 20], "drop_path_rate": 0.1}
    assert cfg.data.options["num_images"] == 3
    with pytest.raises(ConfigError, match="did you mean overrides"):
        load_config(None, ["model.overides.x=1"])


@pytest.mark.parametrize("argv, match", [
    (["--batch", "0"], "--batch and --count-batches"), (["--count-ops", "--count-batches", "0"], "--count-batches"),
    (["--exit-fractions", "1.5"], r"in \[0, 1\]"), (["--exit-fractions", "-0.5", "0.2"], r"in \[0, 1\]"),
    (["--count-ops", "--compile"], "--count-ops counts eager"),
])
def test_bench_refuses_options_no_measurement_can_take(argv, match, capsys):
    """--batch 0 was a reshape traceback; --exit-fractions 1.5 was silently clamped to 1."""
    from dtop.cli import main

    assert main(["bench", "segvit_vit_t16", "--size", "64", "64", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(match, err), err


def test_predict_says_more_when_dtop_costs_more_than_dense():
    """'-7.3% fewer than dense' read as a contradiction; a negative saving is worded as a cost."""
    from dtop.apps.predict import vs_dense

    assert vs_dense(31.25) == "31.2% fewer than dense" and vs_dense(-7.3) == "7.3% more than dense"
