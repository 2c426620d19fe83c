"""Position tables loaded from their true grid: 15 x 20 is never read as 20 x 15, grids are recorded in dtop
checkpoints (inferred from the config for older ones), unknown non-square grids are asked for, lossy
(downsampling) resamplings are reported with the img_size that avoids them."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import dtop
from dtop.checkpoint import (check_and_load, load_checkpoint, position_grids, recorded_grids, save_atomic,
                             source_grid)
from dtop.convert import load_into
from dtop.errors import CheckpointError
from dtop.models.backbone import ViTBackbone

KEY = "backbone.vit.pos_embed"
KW = dict(num_classes=5, backbone_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
          stages=[{"block": 0, "head": "linear"}, {"block": 1, "head": "linear"}])


def tiny(img_size, seed=0, backbone="vit_tiny_patch16_384", **kw):
    """A 2-block segmentor at ``img_size`` whose position table varies along the raster order."""
    torch.manual_seed(seed)
    model = dtop.create_model("segvit_vit_t16", img_size=img_size, backbone=backbone, **{**KW, **kw}).eval()
    pos = model.backbone.vit.pos_embed
    with torch.no_grad():
        pos.copy_(torch.linspace(-1, 1, pos.shape[1]).repeat(pos.shape[2], 1).t()[None] + 0.1 * torch.randn_like(pos))
    return model


def resampled(model, old, new, prefix=1):
    return resample_abs_pos_embed(model.backbone.vit.pos_embed.detach(), new_size=list(new), old_size=list(old),
                                  num_prefix_tokens=prefix)


def pos_of(model):
    return model.backbone.vit.pos_embed.detach()


def test_transposed_grid_of_equal_length_is_refused_then_resampled_with_src_grid():
    a, b = tiny((240, 320)), tiny((320, 240), seed=1)  # 15 x 20 and 20 x 15: 300 positions each
    before = pos_of(b).clone()
    with pytest.raises(CheckpointError, match=r"not a square.*src_grid=\(rows, cols\)"):
        load_into(b, a.state_dict())  # a bare state dict does not say its grid
    assert torch.equal(pos_of(b), before)  # nothing loaded
    with pytest.warns(UserWarning, match=r"img_size=\(240, 320\)"):
        report = load_into(b, a.state_dict(), src_grid=(15, 20))
    torch.testing.assert_close(pos_of(b), resampled(a, (15, 20), (20, 15)), rtol=0, atol=1e-6)
    assert not torch.equal(pos_of(b), pos_of(a))
    assert report["resampled"] == [f"{KEY}: grid 15x20 -> 20x15"]
    assert len(report["lossy"]) == 1 and "downsamples" in report["lossy"][0]  # 20 columns -> 15


@pytest.mark.parametrize("as_file", [True, False])
def test_dtop_checkpoint_records_its_grid_and_loads_from_it(tmp_path, as_file):
    a, b = tiny((240, 320)), tiny((320, 240), seed=1)
    ckpt = {"model": a.state_dict(), "model_config": {**a.cfg.to_dict(), "img_size": None},
            "pos_grid": position_grids(a)}
    assert ckpt["pos_grid"] == {KEY: [15, 20]}
    save_atomic(ckpt, tmp_path / "a.pt")
    assert load_checkpoint(tmp_path / "a.pt")["pos_grid"] == {KEY: [15, 20]}
    with pytest.warns(UserWarning, match="downsamples"):
        report = load_into(b, str(tmp_path / "a.pt") if as_file else ckpt)
    torch.testing.assert_close(pos_of(b), resampled(a, (15, 20), (20, 15)), rtol=0, atol=1e-6)
    assert report["resampled"] == [f"{KEY}: grid 15x20 -> 20x15"]


def test_old_checkpoint_grid_inferred_from_its_config_or_asked_for(tmp_path):
    a, b = tiny((240, 320)), tiny((320, 240), seed=1)
    old = {"model": a.state_dict(), "model_config": a.cfg.to_dict()}  # before grids were recorded
    assert recorded_grids(old) == {KEY: (15, 20)}  # 240 x 320 px over patch 16
    with pytest.warns(UserWarning):
        load_into(b, old)
    torch.testing.assert_close(pos_of(b), resampled(a, (15, 20), (20, 15)), rtol=0, atol=1e-6)
    unknown = {"model": a.state_dict(), "model_config": {**a.cfg.to_dict(), "img_size": None}}
    assert recorded_grids(unknown) is None
    with pytest.raises(CheckpointError, match="pos_grid"):
        check_and_load(b, unknown["model"], grids=recorded_grids(unknown))
    with pytest.raises(CheckpointError, match="pos_grid"):
        recorded_grids({**old, "pos_grid": {KEY: [15, "20"]}})
    square = tiny(256)  # 16 x 16: a square table is inferred as before
    c = tiny(128, seed=2)
    check_and_load(c, square.state_dict())
    torch.testing.assert_close(pos_of(c), resampled(square, (16, 16), (8, 8)), rtol=0, atol=1e-6)


def test_load_model_takes_the_recorded_grid_and_old_checkpoints_still_load(tmp_path):
    a = tiny((240, 320))
    save_atomic({"model": a.state_dict(), "model_config": a.cfg.to_dict()}, tmp_path / "old.pt")
    torch.testing.assert_close(pos_of(dtop.load_model(tmp_path / "old.pt")), pos_of(a), rtol=0, atol=0)
    # a config at 320 x 240 holding a 15 x 20 table (recorded): resampled, never copied verbatim
    cfg = {**a.cfg.to_dict(), "img_size": (320, 240)}
    save_atomic({"model": a.state_dict(), "model_config": cfg, "pos_grid": {KEY: [15, 20]}}, tmp_path / "new.pt")
    with pytest.warns(UserWarning, match="downsamples"):
        loaded = dtop.load_model(tmp_path / "new.pt")
    torch.testing.assert_close(pos_of(loaded), resampled(a, (15, 20), (20, 15)), rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="holds 200 positions but the table has 300"):
        check_and_load(tiny((320, 240)), a.state_dict(), grids={KEY: (10, 20)})


def test_check_and_load_never_copies_across_grids_of_equal_length():
    a, b = tiny((240, 320)), tiny((320, 240), seed=1)
    with pytest.raises(CheckpointError, match="15x20 and 20x15 both hold 300"):
        check_and_load(b, a.state_dict())
    with pytest.warns(UserWarning):
        check_and_load(b, a.state_dict(), grids=position_grids(a))
    torch.testing.assert_close(pos_of(b), resampled(a, (15, 20), (20, 15)), rtol=0, atol=1e-6)


def test_no_embed_class_table_with_registers_resampled_exactly():
    """DINOv2 with registers: no prefix position, the whole table is the grid (patch 14)."""
    kw = dict(backbone="vit_small_patch14_reg4_dinov2")
    a, b = tiny((56, 84), **kw), tiny((84, 56), seed=1, **kw)  # 4 x 6 and 6 x 4
    assert a.backbone.vit.pos_embed.shape[1] == 24
    with pytest.warns(UserWarning, match=r"img_size=\(56, 84\)"):
        check_and_load(b, a.state_dict(), grids=position_grids(a))
    torch.testing.assert_close(pos_of(b), resampled(a, (4, 6), (6, 4), prefix=0), rtol=0, atol=1e-6)


def test_downsampling_is_lossy_upsampling_is_not():
    trained = tiny(256)  # a model trained at 256 px (16 x 16)
    at_default = tiny(None, seed=1, backbone="vit_tiny_patch16_224")  # loaded at timm's default 224 (14 x 14)
    with pytest.warns(UserWarning, match=r"16x16 -> 14x14 downsamples.*img_size=256"):
        report = load_into(at_default, trained.state_dict())
    assert report["lossy"] and "img_size=256" in report["lossy"][0]
    small = tiny(160, seed=2)  # 10 x 10 -> 14 x 14
    report = load_into(at_default, small.state_dict())
    assert report["lossy"] == [] and report["resampled"] == [f"{KEY}: grid 10x10 -> 14x14"]
    same = load_into(tiny(None, seed=3, backbone="vit_tiny_patch16_224"), at_default.state_dict())
    assert same["lossy"] == [] and same["resampled"] == []


def _timm_file(tmp_path, name="vit_tiny_patch16_224", img_size=(240, 320), **kw):
    torch.manual_seed(0)
    vit = timm.create_model(name, img_size=img_size, depth=1, num_classes=0, **kw)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return vit, path


def test_local_pretrained_non_square_table_needs_pretrained_grid(tmp_path):
    vit, path = _timm_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"pretrained_grid"):
        ViTBackbone("vit_tiny_patch16_224", pretrained=str(path), img_size=(320, 240), model_kwargs={"depth": 1})
    with pytest.warns(UserWarning, match="downsamples"):
        bb = ViTBackbone("vit_tiny_patch16_224", pretrained=str(path), img_size=(320, 240),
                         model_kwargs={"depth": 1, "pretrained_grid": (15, 20)})
    want = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[20, 15], old_size=[15, 20], num_prefix_tokens=1)
    torch.testing.assert_close(bb.vit.pos_embed.detach(), want, rtol=0, atol=1e-6)
    assert bb.load_report["resampled"] == ["pos_embed: grid 15x20 -> 20x15"] and bb.load_report["lossy"]
    same = ViTBackbone("vit_tiny_patch16_224", pretrained=str(path), img_size=(240, 320),
                       model_kwargs={"depth": 1, "pretrained_grid": (15, 20)})
    torch.testing.assert_close(same.vit.pos_embed, vit.pos_embed, rtol=0, atol=0)


def test_local_pretrained_meta_dinov2_registers_layout(tmp_path):
    """Meta's DINOv2-with-registers layout (CLS position in pos_embed, register_tokens) on a 4 x 6 grid."""
    vit, _ = _timm_file(tmp_path, "vit_small_patch14_reg4_dinov2", img_size=(56, 84), embed_dim=64, num_heads=2)
    state = {k: v for k, v in vit.state_dict().items() if k not in ("reg_token", "cls_token", "pos_embed")}
    cls_pos = torch.randn(1, 1, 64)
    state.update(register_tokens=vit.reg_token.detach(), mask_token=torch.zeros(1, 64),
                 cls_token=vit.cls_token.detach() - cls_pos, pos_embed=torch.cat([cls_pos, vit.pos_embed.detach()], 1))
    path = tmp_path / "meta.pth"
    torch.save(state, path)
    kw = {"depth": 1, "embed_dim": 64, "num_heads": 2, "pretrained_grid": (4, 6)}
    bb = ViTBackbone("vit_small_patch14_reg4_dinov2", pretrained=str(path), img_size=(56, 84), model_kwargs=kw)
    torch.testing.assert_close(bb.vit.pos_embed, vit.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(bb.vit.cls_token, vit.cls_token)
    with pytest.warns(UserWarning, match=r"4x6 -> 6x4"):
        bb = ViTBackbone("vit_small_patch14_reg4_dinov2", pretrained=str(path), img_size=(84, 56), model_kwargs=kw)
    want = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[6, 4], old_size=[4, 6], num_prefix_tokens=0)
    torch.testing.assert_close(bb.vit.pos_embed.detach(), want, rtol=0, atol=1e-6)


def test_hub_weights_loaded_below_their_training_size_are_lossy():
    bb = ViTBackbone("vit_tiny_patch16_384", img_size=256, model_kwargs={"depth": 1})
    with pytest.warns(UserWarning, match=r"24x24 -> 16x16 downsamples.*img_size=384"):
        bb._check_hub_grid()  # what pretrained=True runs after timm resampled its 384-px weights
    assert bb.load_report["lossy"]
    up = ViTBackbone("vit_tiny_patch16_384", img_size=512, model_kwargs={"depth": 1})
    up._check_hub_grid()
    assert up.load_report["lossy"] == []


def test_source_grid_checks_the_count():
    assert source_grid(196, None, "t", "x") == (14, 14)
    assert source_grid(300, (15, 20), "t", "x") == (15, 20)
    with pytest.raises(CheckpointError, match="give .*: SETTING"):
        source_grid(300, None, "t", "SETTING")


def test_training_records_the_grid_and_finetuning_resamples_from_it(tmp_path):
    from dtop.apps.demo import demo_config
    from dtop.engine import train

    cfg = demo_config(str(tmp_path / "dense"), fast=True)
    cfg.model.overrides["img_size"] = [128, 192]  # 8 x 12
    cfg.train.iters = cfg.train.ckpt_interval = 1
    dense = load_checkpoint(train(cfg))
    assert dense["pos_grid"] == {KEY: [8, 12]}
    ft = demo_config(str(tmp_path / "ft"), fast=True)
    ft.model.overrides["img_size"] = [192, 128]  # 12 x 8: the same 96 positions, transposed
    ft.train.iters = ft.train.ckpt_interval = 1
    ft.train.lr = 0.0  # the loaded weights stay as loaded
    ft.train.scheme, ft.train.init_checkpoint, ft.train.p0 = "finetune", str(tmp_path / "dense" / "last.pt"), 0.9
    with pytest.warns(UserWarning, match="8x12 -> 12x8"):
        tuned = load_checkpoint(train(ft))
    want = resample_abs_pos_embed(dense["model"][KEY], new_size=[12, 8], old_size=[8, 12], num_prefix_tokens=1)
    torch.testing.assert_close(tuned["model"][KEY], want, rtol=0, atol=1e-6)
    assert tuned["pos_grid"] == {KEY: [12, 8]}


# ------------------------------------------------------------------------------- held-back inputs of kind 7
@pytest.mark.parametrize("backbone,src,dst,prefix", [
    ("vit_tiny_patch16_384", (224, 448), (320, 320), 1),           # 14 x 28 -> 20 x 20: rows up, cols down
    ("vit_small_patch14_reg4_dinov2", (56, 112), (84, 84), 0),     # 4 x 8 -> 6 x 6, registers: no prefix position
])
def test_wide_checkpoint_loaded_square_is_resampled_from_its_grid(tmp_path, backbone, src, dst, prefix):
    a, b = tiny(src, backbone=backbone), tiny(dst, seed=1, backbone=backbone)
    p = a.backbone.patch_size
    old, new = (src[0] // p, src[1] // p), (dst[0] // p, dst[1] // p)
    save_atomic({"model": a.state_dict(), "model_config": a.cfg.to_dict(), "pos_grid": position_grids(a)},
                tmp_path / "a.pt")
    with pytest.warns(UserWarning, match=rf"img_size=\({src[0]}, {src[1]}\)"):
        report = load_into(b, str(tmp_path / "a.pt"))
    torch.testing.assert_close(pos_of(b), resampled(a, old, new, prefix), rtol=0, atol=1e-6)
    assert report["resampled"] == [f"{KEY}: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]}"]
    with pytest.raises(CheckpointError, match=r"not a square.*src_grid"):
        load_into(tiny(dst, seed=2, backbone=backbone), a.state_dict())  # the bare weights do not say the grid
    reloaded = dtop.load_model(tmp_path / "a.pt")  # rebuilt at its own grid; timm resamples per input
    x = torch.randn(1, 3, *dst)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward_dense(x), b.forward_dense(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [({"depht": 2}, "unexpected keyword argument 'depht'"),
                                          ({"embed_dim": 65, "num_heads": 2}, "divisible by num_heads")])
def test_backbone_arguments_timm_refuses_are_a_config_error(kwargs, match):
    from dtop.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"timm could not build 'vit_tiny_patch16_384'.*{match}.*backbone_kwargs"):
        ViTBackbone("vit_tiny_patch16_384", model_kwargs=kwargs)
