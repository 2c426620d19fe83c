"""The public API after the layering: the factory, the model's FLOP count from outside, old names that
still work (with a DeprecationWarning), and the errors for names that do not exist."""
import json

import pytest
import torch

import dtop
from conftest import gflops, images, tiny_model
from dtop.cli import main
from dtop.errors import ConfigError, did_you_mean, unknown_name
from dtop.flops import dense_flops
from dtop.models import DToPSegmentor, ReducedSegmentor, build_model


def test_factory_builds_the_right_class_and_keeps_state_dict_keys():
    plain = dtop.create_model("segvit_vit_t16", num_classes=3, backbone_kwargs={"depth": 4}, stages=[
        {"block": 1, "head": "linear"}, {"block": 3, "head": "linear"}])
    conv = build_model(plain.cfg.__class__.from_dict({**plain.cfg.to_dict(), "reduction": {"kind": "conv"}}))
    assert type(plain) is DToPSegmentor and type(conv) is ReducedSegmentor
    extra = set(conv.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("reducer.") for k in extra)
    assert set(plain.state_dict()) <= set(conv.state_dict())
    with pytest.raises(ConfigError, match="token-reduction alternative"):
        DToPSegmentor(conv.cfg)


def test_load_model_round_trip(tmp_path):
    model = tiny_model(("atm", "linear", "mask"), cls_mode="segmenter", p0=0.7)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, path)
    loaded = dtop.load_model(path)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).scores, model(x).scores)
    assert loaded.p0 == [0.7, 0.7]
    reduced = dtop.load_model(path, reduction=dtop.models.ReductionSpec("avgpool", block=2))
    assert isinstance(reduced, ReducedSegmentor)


def test_gflops_come_from_the_flop_counter_not_the_output():
    model = tiny_model(p0=1.0)
    with torch.no_grad():
        out = model(images(2))
    assert torch.equal(dtop.forward_gflops(model, out), gflops(model, out))
    assert float(gflops(model, out)[0]) == dense_flops(model, (64, 96), final_head_only=True) / 1e9
    with pytest.raises(AttributeError, match="forward_gflops"):
        out.gflops  # noqa: B018


def test_deprecated_names_still_work_and_warn():
    model = tiny_model(p0=0.5)
    x = images(2)
    with torch.no_grad():
        out = model(x)
    with pytest.warns(DeprecationWarning, match="scores"):
        assert out.logits is out.scores
    with pytest.warns(DeprecationWarning, match="canvas"):
        assert out.token_logits is out.canvas
    with pytest.warns(DeprecationWarning, match="set_layout"):
        model.set_execution("packed", False)
    assert model.layout == model.execution == "packed"
    model.execution = "padded"
    assert model.layout == "padded"


def test_bench_json_keeps_the_old_layout_keys(capsys):
    assert main(["bench", "segvit_vit_t16", "--size", "32", "48", "--batch", "2", "--num-classes", "3",
                 "--warmup", "0", "--repeats", "1", "--paths", "per_image", "--json", "--allocator", "system"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    assert list(r["layouts"]) == ["per_image"] and r["layout"] == "per_image"
    assert r["paths"] == r["layouts"] and r["path"] == r["layout"]
    assert "--paths is deprecated; use --layouts" in captured.err


def test_unknown_names_say_what_was_meant():
    assert did_you_mean("paded", ["padded", "packed"]) == " (did you mean padded?)"
    assert did_you_mean("xyz", ["padded"]) == ""
    err = unknown_name("layout", "paded", ["per_image", "padded"])
    assert isinstance(err, ConfigError) and str(err) == \
        "unknown layout 'paded' (did you mean padded?); choose from per_image, padded"
    with pytest.raises(ConfigError, match="did you mean topk"):
        dtop.get_config("segvit_vit_t16", topkk=3)
    with pytest.raises(ConfigError, match=r"unknown reduction 'avgpol' \(did you mean avgpool\?\)"):
        dtop.models.ReductionSpec("avgpol")


def test_no_weight_decay_names_the_embeddings_and_queries():
    model = tiny_model(("atm", "linear", "mask"), cls_mode="segmenter")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"backbone.vit.pos_embed", "backbone.vit.cls_token", "heads.0.query", "heads.2.cls_emb"} <= names
    assert all(params[n].ndim > 1 for n in names if n in params)  # what norms and biases do not already cover


def test_predict_and_bench_take_a_checkpoint_of_an_alternative(tmp_path, capsys):
    """A token-reduction checkpoint (dtop compare trains them) runs through predict and bench; --p0 is
    reported as having no effect instead of failing."""
    import numpy as np
    from PIL import Image

    base = tiny_model(("linear", "linear", "linear"))
    model = build_model(base.cfg.__class__.from_dict({**base.cfg.to_dict(), "reduction": {"kind": "avgpool",
                                                                                           "block": 2}}))
    ckpt = tmp_path / "avgpool.pt"
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, ckpt)
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--p0", "0.5"]) == 0
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert result["p0"] is None and result["images"][0]["reduction_pct"] > 0
    assert "--p0 has no effect" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(ckpt), "--images", str(tmp_path), "--size", "64", "96", "--batch", "1",
                 "--warmup", "0", "--repeats", "1", "--layouts", "per_image", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["flop_ratio"] < 1 and r["exit_fractions"] == [0.0]  # one image; nothing exits early
