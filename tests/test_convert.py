"""Checkpoint conversion: each source format is rebuilt here as small reference modules with the
source's parameter names and forward math (official Segmenter, mmseg ViT + Segmenter mask head,
DToP PruneHead); their random weights are converted into dtop models whose head outputs must
equal the reference outputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtop
from dtop.convert import FORMATS, convert_state_dict, detect_format, load_into
from dtop.errors import CheckpointError
from dtop.models import DToPSegmentor, SegmentorConfig, StageSpec

D, HEADS, DEPTH, GRID, K = 64, 2, 4, 4, 5  # tiny: 64 channels, 4 blocks, 4x4 patches (64 px), 5 classes
ATM_DIM = 32


# ---------------------------------------------------------------------------- reference modules
class SegBlock(nn.Module):
    """Official Segmenter block (segm/model/blocks.py): pre-norm, fused qkv with bias."""

    def __init__(self, d, h, eps=1e-5):
        super().__init__()
        self.h = h
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (C // self.h) ** -0.5).softmax(-1)
        x = x + self.attn.proj((a @ qkv[2]).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class SegEncoder(nn.Module):
    def __init__(self, d=D, depth=DEPTH, h=HEADS, grid=GRID):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, d))
        self.blocks = nn.ModuleList(SegBlock(d, h) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1000)

    def forward(self, im):  # -> all tokens after the final norm, CLS first
        x = self.patch_embed.proj(im).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class SegMaskTransformer(nn.Module):
    """Official Segmenter decoder: ``x @ proj_patch`` with raw matrices."""

    def __init__(self, n_cls=K, d=D, layers=1, h=HEADS):
        super().__init__()
        self.n_cls = n_cls
        self.blocks = nn.ModuleList(SegBlock(d, h) for _ in range(layers))
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d))
        self.proj_dec = nn.Linear(d, d)
        self.proj_patch = nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.proj_classes = nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.decoder_norm = nn.LayerNorm(d)
        self.mask_norm = nn.LayerNorm(n_cls)

    def forward(self, x):  # (B, n, d) -> (B, K, n)
        x = torch.cat([self.proj_dec(x), self.cls_emb.expand(len(x), -1, -1)], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        p = F.normalize(x[:, :-self.n_cls] @ self.proj_patch, dim=-1)
        c = F.normalize(x[:, -self.n_cls:] @ self.proj_classes, dim=-1)
        return self.mask_norm(p @ c.transpose(1, 2)).transpose(1, 2)


class Holder(nn.Module):
    """A bare attribute holder so state-dict names nest like mmcv's wrappers."""


class MMLayer(nn.Module):
    """mmseg TransformerEncoderLayer: ln1, attn.attn (nn.MultiheadAttention), ln2, ffn.layers."""

    def __init__(self, d, h, eps):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn = Holder()
        self.attn.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.ffn = Holder()
        self.ffn.layers = nn.Sequential(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.0)),
                                        nn.Linear(4 * d, d), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn.attn(y, y, y, need_weights=False)[0]
        return x + self.ffn.layers(self.ln2(x))


class MMViT(nn.Module):
    """mmseg VisionTransformer: patch_embed.projection, cls_token, pos_embed, layers, ln1 (final_norm)."""

    def __init__(self, final_norm, with_cls_token, d=D, depth=DEPTH, h=HEADS, grid=GRID):
        super().__init__()
        self.with_cls_token = with_cls_token
        self.patch_embed = Holder()
        self.patch_embed.projection = nn.Conv2d(3, d, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, d))
        self.layers = nn.ModuleList(MMLayer(d, h, 1e-6) for _ in range(depth))
        self.final_norm = final_norm
        if final_norm:
            self.ln1 = nn.LayerNorm(d, eps=1e-6)

    def forward(self, im, out_indices):  # -> {index: patch tokens (B, n, d)}
        x = self.patch_embed.projection(im).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        if not self.with_cls_token:
            x = x[:, 1:]
        outs = {}
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in out_indices:
                outs[i] = x[:, 1:] if self.with_cls_token else x
        return outs


class MMMaskHead(nn.Module):
    """mmseg SegmenterMaskTransformerHead: Linear patch_proj/classes_proj (x @ W.T), conv_seg unused."""

    def __init__(self, n_cls=K, d=D, layers=1, h=HEADS):
        super().__init__()
        self.n_cls = n_cls
        self.layers = nn.ModuleList(MMLayer(d, h, 1e-5) for _ in range(layers))
        self.dec_proj = nn.Linear(d, d)
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d))
        self.patch_proj = nn.Linear(d, d, bias=False)
        self.classes_proj = nn.Linear(d, d, bias=False)
        self.decoder_norm = nn.LayerNorm(d)
        self.mask_norm = nn.LayerNorm(n_cls)
        self.conv_seg = nn.Conv2d(d, n_cls, 1)

    def forward(self, x):
        x = torch.cat([self.dec_proj(x), self.cls_emb.expand(len(x), -1, -1)], 1)
        for layer in self.layers:
            x = layer(x)
        x = self.decoder_norm(x)
        p = F.normalize(self.patch_proj(x[:, :-self.n_cls]), dim=-1)
        c = F.normalize(self.classes_proj(x[:, -self.n_cls:]), dim=-1)
        return self.mask_norm(p @ c.transpose(1, 2)).transpose(1, 2)


class PruneAttention(nn.Module):
    """DToP's cross-attention: q, k, v, proj Linears; returns head-averaged pre-softmax logits."""

    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, xq, xkv):
        B, Q, C = xq.shape
        split = lambda t: t.reshape(B, -1, self.h, C // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(xq)), split(self.k(xkv)), split(self.v(xkv))
        logits = (q @ k.transpose(-2, -1)) * (C // self.h) ** -0.5
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, Q, C)
        return self.proj(out), logits.sum(1) / self.h


class PruneLayer(nn.TransformerDecoderLayer):
    """TPN_DecoderLayer: torch's post-norm decoder layer with multihead_attn replaced."""

    def __init__(self, d, h):
        super().__init__(d_model=d, nhead=h, dim_feedforward=4 * d, dropout=0.0)
        del self.multihead_attn
        self.multihead_attn = PruneAttention(d, h)

    def forward(self, tgt, memory):  # tgt (Q, B, d) sequence-first, memory (B, n, d)
        tgt = self.norm1(tgt + self.self_attn(tgt, tgt, tgt, need_weights=False)[0])
        out, attn = self.multihead_attn(tgt.transpose(0, 1), memory)
        tgt = self.norm2(tgt + out.transpose(0, 1))
        tgt = self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        return tgt, attn


class LossDecode(nn.Module):
    def __init__(self):
        super().__init__()
        self.criterion = Holder()
        self.criterion.register_buffer("empty_weight", torch.ones(2))


class PruneHead(nn.Module):
    def __init__(self, in_dim=D, n_cls=K, d=ATM_DIM, layers=2, h=HEADS):
        super().__init__()
        self.input_proj, self.proj_norm = nn.Linear(in_dim, d), nn.LayerNorm(d)
        self.decoder = Holder()
        self.decoder.layers = nn.ModuleList(PruneLayer(d, h) for _ in range(layers))
        self.q = nn.Embedding(n_cls, d)
        self.class_embed = nn.Linear(d, 2)
        self.loss_decode = LossDecode()

    def forward(self, x):  # -> mask logits (B, K, n), class logits (B, K, 2)
        x = self.proj_norm(self.input_proj(x))
        q = self.q.weight.unsqueeze(1).repeat(1, len(x), 1)
        for layer in self.decoder.layers:
            q, attn = layer(q, x)
        return attn, self.class_embed(q.transpose(0, 1))


# ---------------------------------------------------------------------------- helpers
def randomise(module, seed):
    """Random weights everywhere (norms and biases too) so a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if isinstance(p, nn.Parameter):
                base = 1.0 if (name.endswith("weight") and p.dim() == 1) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def prefixed(prefix, module):
    return {prefix + k: v.clone() for k, v in module.state_dict().items()}


def make_model(stages, cls_mode, final_norm, num_classes=K, grid=GRID, seed=0) -> DToPSegmentor:
    torch.manual_seed(seed)
    cfg = SegmentorConfig(backbone="vit_tiny_patch16_224", num_classes=num_classes, stages=stages, p0=1.0,
                          cls_mode=cls_mode, final_norm=final_norm, img_size=16 * grid,
                          backbone_kwargs=dict(embed_dim=D, depth=DEPTH, num_heads=HEADS))
    return DToPSegmentor(cfg).eval()


def set_eps(module, eps):
    """timm's blocks use LayerNorm eps 1e-6 where Segmenter (and mmseg's mask head) use 1e-5; eps is
    not a weight, so the equivalence tests give the dtop model the source's eps."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


def atm(block, layers=2):
    return StageSpec(block, "atm", {"dim": ATM_DIM, "num_layers": layers, "num_heads": HEADS})


def mask(block, layers=1):
    return StageSpec(block, "mask", {"num_layers": layers, "num_heads": HEADS})


def head_outputs(model, images):
    """Each stage head's output on all tokens, computed from the model's parts."""
    x, _ = model.backbone.embed(images)
    P = model.backbone.prefix_in_blocks
    outs = []
    for i, blk in enumerate(model.backbone.blocks):
        x = blk(x)
        if i in model.stage_blocks:
            s = model.stage_blocks.index(i)
            t = x[:, P:]
            if s == model.num_stages - 1 and model.cfg.final_norm:
                t = model.backbone.final_norm(t)
            outs.append(model.heads[s](t))
    return outs


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def images(n=2):
    return torch.randn(n, 3, 16 * GRID, 16 * GRID, generator=torch.Generator().manual_seed(3))


def segmenter_source(n_cls=K, seed=1):
    enc, dec = randomise(SegEncoder(), seed), randomise(SegMaskTransformer(n_cls), seed + 1)
    return enc, dec, {**prefixed("encoder.", enc), **prefixed("decoder.", dec)}


def segvit_source(seed=5, layers=2):
    vit = randomise(MMViT(final_norm=False, with_cls_token=False), seed)
    heads = [randomise(PruneHead(layers=layers), seed + 1 + i) for i in range(3)]
    state = {**prefixed("backbone.", vit), **prefixed("decode_head.", heads[2]),
             **prefixed("auxiliary_head.0.", heads[0]), **prefixed("auxiliary_head.1.", heads[1])}
    return vit, heads, state


# ---------------------------------------------------------------------------- equivalence
def test_segmenter_checkpoint_equals_source():
    enc, dec, state = segmenter_source()
    model = make_model([atm(1), mask(3)], "segmenter", final_norm=True)
    report = load_into(model, state)
    assert not any("heads.1: LayerNorm eps" in n for n in report["notes"])  # our mask head uses Segmenter's eps
    set_eps(model.backbone, 1e-5)
    x = images()
    with torch.no_grad():
        ref = dec(enc(x)[:, 1:])
        ours = head_outputs(model, x)[-1].logits
        dense = model.forward_dense(x)
    close(ours, ref)
    assert model.space == "prob"  # ATM + mask heads: the canvas holds probabilities
    close(dense, F.interpolate(ref.softmax(1).reshape(2, K, GRID, GRID), size=x.shape[-2:], mode="bilinear",
                               align_corners=False))
    assert report["format"] == "segmenter"
    assert report["initialised"] == ["heads.0."]
    assert report["heads"] == {"heads.1.": "decoder."}
    assert {"encoder.head.weight", "encoder.head.bias"} <= set(report["dropped"])
    assert "decoder.blocks.0.attn.qkv.bias" not in report["dropped"]  # qkv biases map directly, q included
    assert not report["lossy"]


def test_mmseg_segmenter_checkpoint_equals_source():
    vit = randomise(MMViT(final_norm=True, with_cls_token=True), 11)
    head = randomise(MMMaskHead(), 12)
    aux = {"auxiliary_head.convs.0.weight": torch.randn(8, D, 3, 3)}  # an FCN aux head: dropped
    state = {**prefixed("backbone.", vit), **prefixed("decode_head.", head), **aux}
    assert detect_format(state) == "mmseg_segmenter"
    model = make_model([atm(1), atm(2), mask(3)], "segmenter", final_norm=True)
    report = load_into(model, state)
    x = images()
    with torch.no_grad():
        ref = head(vit(x, [DEPTH - 1])[DEPTH - 1])
        ours = head_outputs(model, x)[-1].logits
    close(ours, ref)
    assert report["initialised"] == ["heads.0.", "heads.1."]
    assert "decode_head.conv_seg.weight" in report["dropped"]
    assert "auxiliary_head.convs.0.weight" in report["dropped"]
    assert not report["lossy"]


def test_mmseg_segvit_checkpoint_equals_source_at_every_stage():
    vit, heads, state = segvit_source()
    assert detect_format(state) == "mmseg_segvit"
    model = make_model([atm(1), atm(2), atm(3)], "segvit", final_norm=False)
    report = load_into(model, state)
    x = images()
    with torch.no_grad():
        feats = vit(x, [1, 2, 3])
        refs = [heads[s](feats[b]) for s, b in enumerate([1, 2, 3])]
        ours = head_outputs(model, x)
        dense = model.forward_dense(x)
    for (ref_mask, ref_cls), out in zip(refs, ours):
        close(out.logits, ref_mask)
        close(out.presence, ref_cls)
    ref_final = (refs[-1][1].softmax(-1)[..., :1] * refs[-1][0].sigmoid()).reshape(2, K, GRID, GRID)
    close(dense, F.interpolate(ref_final, size=x.shape[-2:], mode="bilinear", align_corners=False))
    assert report["heads"] == {"heads.0.": "auxiliary_head.0.", "heads.1.": "auxiliary_head.1.",
                               "heads.2.": "decode_head."}
    assert report["initialised"] == ["backbone.vit.norm."]  # DToP's backbone has no final norm
    assert "decode_head.loss_decode.criterion.empty_weight" in report["dropped"]
    assert not report["lossy"] and not report["resampled"]


def test_dtop_state_dict_round_trip(tmp_path):
    src = make_model([atm(1), atm(2), mask(3)], "segmenter", final_norm=True, seed=1)
    dst = make_model([atm(1), atm(2), mask(3)], "segmenter", final_norm=True, seed=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    report = load_into(dst, path)
    assert report["format"] == "dtop" and report["initialised"] == []
    x = images()
    with torch.no_grad():
        close(dst.forward_dense(x), src.forward_dense(x), tol=1e-6)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    _, _, state = segvit_source()
    path = tmp_path / "dtop_segvit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = make_model([atm(1), atm(2), atm(3)], "segvit", final_norm=False)
    assert load_into(model, path)["format"] == "mmseg_segvit"


# ---------------------------------------------------------------------------- detection and errors
def test_detect_format():
    assert detect_format(make_model([mask(3)], "segmenter", True).state_dict()) == "dtop"
    assert detect_format(segmenter_source()[2]) == "segmenter"
    assert detect_format(segvit_source()[2]) == "mmseg_segvit"
    assert set(FORMATS) == {"dtop", "segmenter", "mmseg_segmenter", "mmseg_segvit"}


def test_unknown_format_lists_keys():
    state = {"features.0.weight": torch.zeros(1), "classifier.bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unknown checkpoint format.*features.0.weight"):
        detect_format(state)
    model = make_model([mask(3)], "segmenter", True)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_into(model, state)


def test_mmseg_backbone_with_unsupported_head():
    vit = MMViT(final_norm=True, with_cls_token=True)
    state = {**prefixed("backbone.", vit), "decode_head.conv_seg.weight": torch.zeros(K, D, 1, 1)}
    with pytest.raises(CheckpointError, match="decode head dtop cannot convert.*decode_head.conv_seg.weight"):
        detect_format(state)


def test_class_count_mismatch_names_key_and_shapes():
    _, _, state = segmenter_source(n_cls=7)
    model = make_model([mask(3)], "segmenter", True)
    with pytest.raises(CheckpointError) as e:
        convert_state_dict(state, model)
    msg = str(e.value)
    assert "heads.0.cls_emb (from decoder.cls_emb)" in msg
    assert "(1, 7, 64)" in msg and "(1, 5, 64)" in msg and "num_classes=7" in msg


def test_wrong_head_type_and_layer_count():
    _, _, seg = segmenter_source()
    with pytest.raises(CheckpointError, match="'mask' head.*heads.0.*'atm'"):
        convert_state_dict(seg, make_model([atm(3)], "segvit", False))
    _, _, segvit = segvit_source(layers=3)
    with pytest.raises(CheckpointError, match="3 decoder layers.*num_layers': 3"):
        convert_state_dict(segvit, make_model([atm(1), atm(2), atm(3)], "segvit", False))


def test_missing_and_unknown_keys():
    _, _, state = segvit_source()
    model = make_model([atm(1), atm(2), atm(3)], "segvit", False)
    partial = {k: v for k, v in state.items() if k != "decode_head.proj_norm.weight"}
    with pytest.raises(CheckpointError, match="lacks weights.*heads.2.proj_norm.weight"):
        load_into(model, partial)
    extra = {**state, "backbone.patch_embed.norm.weight": torch.ones(D)}
    with pytest.raises(CheckpointError, match="does not recognise.*backbone.patch_embed.norm.weight"):
        load_into(model, extra)


def test_pos_embed_resampled_to_model_grid():
    grid_src = 8
    vit = randomise(MMViT(final_norm=False, with_cls_token=False, grid=grid_src), 5)
    _, heads, state = segvit_source()
    state.update(prefixed("backbone.", vit))
    pos = torch.randn(1, 1 + grid_src * grid_src, D)
    pos[:, 1:] = 0.25  # a constant field stays constant under interpolation
    state["backbone.pos_embed"] = pos
    model = make_model([atm(1), atm(2), atm(3)], "segvit", False)
    converted, report = convert_state_dict(state, model)
    new = converted["backbone.vit.pos_embed"]
    assert new.shape == (1, 1 + GRID * GRID, D)
    close(new[:, :1], pos[:, :1], tol=0)  # CLS position untouched
    close(new[:, 1:], torch.full_like(new[:, 1:], 0.25), tol=1e-5)
    assert report["resampled"] == ["backbone.vit.pos_embed: grid 8x8 -> 4x4"]

    # a non-square source grid needs src_grid
    state["backbone.pos_embed"] = torch.randn(1, 1 + 6 * 2, D)
    with pytest.raises(CheckpointError, match="src_grid"):
        convert_state_dict(state, model)
    converted, report = convert_state_dict(state, model, src_grid=(2, 6))
    assert converted["backbone.vit.pos_embed"].shape == (1, 1 + GRID * GRID, D)
    assert report["resampled"] == ["backbone.vit.pos_embed: grid 2x6 -> 4x4"]


def test_segmenter_checkpoint_into_preset_reports_aux_heads_initialised(tmp_path):
    """A full-size Segmenter ViT-Ti checkpoint trained at 512 px (32x32 grid) into segmenter_vit_t16."""
    d, grid = 192, 32
    enc = SegEncoder(d=d, depth=12, h=3, grid=grid)
    dec = SegMaskTransformer(n_cls=K, d=d, layers=2, h=3)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {**prefixed("encoder.", enc), **prefixed("decoder.", dec)}, "epoch": 64}, path)
    model = dtop.create_model("segmenter_vit_t16", num_classes=K)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.0.")}
    report = load_into(model, path)
    assert report["format"] == "segmenter"
    assert report["initialised"] == ["heads.0.", "heads.1."]
    assert report["heads"] == {"heads.2.": "decoder."}
    assert report["resampled"] == ["backbone.vit.pos_embed: grid 32x32 -> 24x24"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # left at their initialisation
    torch.testing.assert_close(after["backbone.vit.blocks.11.mlp.fc2.weight"], enc.blocks[11].mlp.fc2.weight)
    torch.testing.assert_close(after["heads.2.proj_patch"], dec.proj_patch)
