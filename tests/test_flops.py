"""The analytic GFLOPs counter against fvcore, and against the paper's table."""
import warnings

import pytest
import torch

import dtop
from conftest import CLS_MODES, DINOV2_TINY, HEAD_SETS, gflops, images, p0_at_quantile, tiny_model
from dtop.flops import PAPER_TABLE, dense_flops, preset_gflops
from dtop.models import set_fused_attn

fvcore_nn = pytest.importorskip("fvcore.nn")


class _AllOutputs(torch.nn.Module):
    """Returns every tensor the forward produces, so the trace keeps every head that ran."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return (out.logits, *[t for s in out.stages for t in (s.canvas, s.logits, s.presence) if t is not None])


def fvcore_count(model, x) -> int:
    set_fused_attn(model, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = fvcore_nn.FlopCountAnalysis(_AllOutputs(model), (x,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total())


@pytest.mark.parametrize("heads", list(HEAD_SETS))
@pytest.mark.parametrize("cls_mode", CLS_MODES)
@pytest.mark.parametrize("pruned", [False, True])
def test_analytic_equals_fvcore(heads, cls_mode, pruned):
    check_against_fvcore(tiny_model(HEAD_SETS[heads], cls_mode=cls_mode, topk=1), images(1, 64, 96, seed=2), pruned)


@pytest.mark.parametrize("cls_mode", CLS_MODES)
@pytest.mark.parametrize("pruned", [False, True])
def test_dinov2_with_layerscale_and_registers_equals_fvcore(cls_mode, pruned):
    """Patch 14, LayerScale and 4 register tokens (which run through the blocks in segmenter mode)."""
    model = tiny_model(HEAD_SETS["mixed"], cls_mode=cls_mode, topk=1, **DINOV2_TINY)
    assert model.backbone.num_prefix == 5 and model.backbone.patch_size == 14
    check_against_fvcore(model, images(1, 56, 84, seed=2), pruned)


def check_against_fvcore(model, x, pruned: bool) -> None:
    """The analytic count of one forward equals fvcore's, with about 70% of the tokens exiting when pruned."""
    if pruned:
        model.set_p0([p0_at_quantile(model, x, 0.3), p0_at_quantile(model, x, 0.3, stage=1)])
    with torch.no_grad():
        out = model(x)
    if pruned:
        assert (out.exit_stage < 2).any()
    assert round(gflops(model, out).item() * 1e9) == fvcore_count(model, x)


@pytest.mark.parametrize("name", ["segvit_vit_t16", "segmenter_vit_t16", "segvit_dinov2_s14", "segmenter_dinov2_s14"])
def test_presets_analytic_equals_fvcore(name):
    model = dtop.create_model(name, num_classes=7, p0=1.0).eval()
    x = images(1, 56, 84) if "dinov2" in name else images(1, 48, 80)
    with torch.no_grad():
        out = model(x)
    assert round(gflops(model, out).item() * 1e9) == fvcore_count(model, x)
    assert round(gflops(model, out).item() * 1e9) == dense_flops(model, tuple(x.shape[-2:]), final_head_only=True)  # idle heads skipped


@pytest.mark.parametrize("name,crop,k,final_only,ref", PAPER_TABLE)
def test_reproduces_paper_table(name, crop, k, final_only, ref):
    g = preset_gflops(name, (crop, crop), k, final_only)
    assert abs(g - ref) / ref < 0.005, f"{name} {crop} {k}: {g:.2f} vs {ref}"


def test_final_head_only_is_cheaper_and_size_scales():
    full = preset_gflops("segmenter_vit_b16", (512, 512), 150)
    final = preset_gflops("segmenter_vit_b16", (512, 512), 150, final_head_only=True)
    assert final < full
    assert preset_gflops("segvit_vit_b16", (512, 1024), 150) > 1.9 * preset_gflops("segvit_vit_b16", (512, 512), 150)


def test_batched_count_equals_per_image_count():
    from dtop.flops import segmentor_flops, segmentor_flops_batch

    model = tiny_model(("atm", "linear", "mask"), cls_mode="segmenter")
    tokens = torch.tensor([[25, 25, 25, 25], [25, 13, 13, 4], [25, 1, 0, 0]])
    heads = torch.tensor([[24, 24, 24], [24, 12, 3], [24, 0, 0]])
    batched = segmentor_flops_batch(model, (64, 96), tokens, heads)
    for b in range(3):
        assert batched[b] == segmentor_flops(model, (64, 96), tokens[b].tolist(), heads[b].tolist())


def test_a_size_off_the_patch_grid_is_refused_not_floored():
    from dtop.errors import InputError

    with pytest.raises(InputError, match="512 x 512 is not a positive multiple of the patch size 14.*518 x 518"):
        preset_gflops("segvit_dinov2_s14", (512, 512), 11)
    with pytest.raises(InputError, match="patch size 16.*64 x 96"):
        preset_gflops("segvit_vit_t16", (60, 96), 11)
    assert preset_gflops("segvit_dinov2_s14", (518, 518), 11) > preset_gflops("segvit_dinov2_s14", (504, 504), 11)
