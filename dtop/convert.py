"""Convert published segmentation checkpoints to dtop's parameter names.

Supported source formats (:data:`FORMATS`):

- ``"dtop"``: dtop's own state dicts (``backbone.vit.*``, ``heads.{s}.*``); only the position
  embeddings are resampled when the grid differs.
- ``"segmenter"``: the official Segmenter code (rstrudel/segmenter): ``encoder.*`` (a timm-like
  ViT: ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``, classifier ``head``) and ``decoder.*`` (``MaskTransformer``: ``proj_dec``,
  ``cls_emb``, ``blocks.{i}``, ``decoder_norm``, raw matrices ``proj_patch``/``proj_classes``
  used as ``x @ P``, ``mask_norm``).
- ``"mmseg_segmenter"``: MMSegmentation's ``VisionTransformer`` backbone
  (``backbone.patch_embed.projection``, ``backbone.layers.{i}.{ln1,attn.attn.in_proj_*,
  attn.attn.out_proj,ln2,ffn.layers.0.0,ffn.layers.1}``, final norm ``backbone.ln1``) with a
  ``SegmenterMaskTransformerHead`` (``decode_head.{dec_proj,cls_emb,layers.{i},decoder_norm,
  patch_proj,classes_proj,mask_norm}``; ``patch_proj``/``classes_proj`` are ``nn.Linear``, i.e.
  ``x @ W.T``, so they are transposed into our ``x @ P`` matrices).
- ``"mmseg_segvit"``: the DToP release (zbwxp/Dynamic-Token-Pruning): the same mmseg ViT backbone
  and ``PruneHead`` ATM heads in ``decode_head.*`` (final stage) and ``auxiliary_head.{i}.*``
  (stage ``i``): ``input_proj``, ``proj_norm``, ``q.weight`` (an ``nn.Embedding`` K x d),
  ``class_embed`` (Linear d -> 2), ``decoder.layers.{l}.{self_attn.in_proj_*, self_attn.out_proj,
  multihead_attn.{q,k,v,proj}, norm1..3, linear1, linear2}``.

Use :func:`load_into` to read a file, convert and load it; :func:`convert_state_dict` for the
mapping alone. The returned report says which of our parameters came from where, which source
keys were dropped, which of our heads the checkpoint lacks (left at their initialisation), and
whether anything was approximated.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .checkpoint import read_file, recorded_grids, resample_positions, source_grid, unwrap_state_dict
from .errors import CheckpointError

FORMATS = ("dtop", "segmenter", "mmseg_segmenter", "mmseg_segvit")
_SHOW = 8

# A rule: (source sub-key regex, our sub-key template or None to drop, transform name or None).
Rule = tuple[str, Optional[str], Optional[str]]

_TIMM_BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"


def _mmcv_layer_rules(src: str, dst: str) -> list[Rule]:
    """mmseg ``TransformerEncoderLayer`` (mmcv ``MultiheadAttention``/``FFN``) -> timm ``Block``.

    ``src`` is a regex with one group (the layer index), ``dst`` our prefix with ``\\1``."""
    return [
        (src + r"\.ln([12])\.(weight|bias)", dst + r".norm\2.\3", None),
        (src + r"\.attn\.attn\.in_proj_(weight|bias)", dst + r".attn.qkv.\2", None),
        (src + r"\.attn\.attn\.out_proj\.(weight|bias)", dst + r".attn.proj.\2", None),
        (src + r"\.ffn\.layers\.0\.0\.(weight|bias)", dst + r".mlp.fc1.\2", None),
        (src + r"\.ffn\.layers\.1\.(weight|bias)", dst + r".mlp.fc2.\2", None),
    ]


_BACKBONE_RULES: dict[str, list[Rule]] = {
    "segmenter": [
        (r"(cls_token|dist_token)", r"\1", None),
        (r"pos_embed", "pos_embed", "pos_embed"),
        (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1", None),
        (r"blocks\.(\d+)\." + _TIMM_BLOCK, r"blocks.\1.\2.\3", None),
        (r"norm\.(weight|bias)", r"norm.\1", None),
        (r"(head|head_dist)\..*", None, None),  # ImageNet classifier
    ],
    "mmseg": [
        (r"cls_token", "cls_token", None),
        (r"pos_embed", "pos_embed", "pos_embed"),
        (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1", None),
        *_mmcv_layer_rules(r"layers\.(\d+)", r"blocks.\1"),
        (r"ln1\.(weight|bias)", r"norm.\1", None),  # final_norm=True
    ],
}

_HEAD_RULES: dict[str, list[Rule]] = {
    # official Segmenter MaskTransformer -> MaskTransformerHead
    "segmenter_mask": [
        (r"proj_dec\.(weight|bias)", r"proj_dec.\1", None),
        (r"(cls_emb|proj_patch|proj_classes)", r"\1", None),
        (r"(decoder_norm|mask_norm)\.(weight|bias)", r"\1.\2", None),
        (r"blocks\.(\d+)\." + _TIMM_BLOCK, r"blocks.\1.\2.\3", None),
    ],
    # mmseg SegmenterMaskTransformerHead -> MaskTransformerHead
    "mmseg_mask": [
        (r"dec_proj\.(weight|bias)", r"proj_dec.\1", None),
        (r"cls_emb", "cls_emb", None),
        (r"patch_proj\.weight", "proj_patch", "transpose"),
        (r"classes_proj\.weight", "proj_classes", "transpose"),
        (r"(decoder_norm|mask_norm)\.(weight|bias)", r"\1.\2", None),
        *_mmcv_layer_rules(r"layers\.(\d+)", r"blocks.\1"),
        (r"(conv_seg|loss_decode)\..*", None, None),
    ],
    # DToP PruneHead -> ATMHead
    "prune": [
        (r"(input_proj|proj_norm)\.(weight|bias)", r"\1.\2", None),
        (r"q\.weight", "query", "unsqueeze0"),
        (r"class_embed\.(weight|bias)", r"presence.\1", None),
        (r"decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", r"layers.\1.self_attn.{}.\2", "split3"),
        (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"layers.\1.self_attn.proj.\2", None),
        (r"decoder\.layers\.(\d+)\.multihead_attn\.(q|k|v|proj)\.(weight|bias)", r"layers.\1.cross_attn.\2.\3", None),
        (r"decoder\.layers\.(\d+)\.norm([123])\.(weight|bias)", r"layers.\1.norm\2.\3", None),
        (r"decoder\.layers\.(\d+)\.linear1\.(weight|bias)", r"layers.\1.ffn.0.\2", None),
        (r"decoder\.layers\.(\d+)\.linear2\.(weight|bias)", r"layers.\1.ffn.2.\2", None),
        (r"(conv_seg|loss_decode)\..*", None, None),
    ],
}

# Source head kind -> our head type.
_HEAD_TYPE = {"segmenter_mask": "mask", "mmseg_mask": "mask", "prune": "atm"}
# LayerNorm eps of the source modules: official Segmenter uses torch's default everywhere; mmseg
# heads use LN's default; the mmseg backbone's eps comes from the config (1e-6 in the published
# Segmenter and DToP configs, assumed here).
_SOURCE_EPS = {"segmenter": 1e-5, "mmseg": 1e-6, "segmenter_mask": 1e-5, "mmseg_mask": 1e-5, "prune": 1e-5}
# Where each head kind keeps its decoder layers (source regex) and where ours are.
_LAYER_SRC = {"segmenter_mask": r"blocks\.(\d+)\.", "mmseg_mask": r"layers\.(\d+)\.",
              "prune": r"decoder\.layers\.(\d+)\."}
_LAYER_OURS = {"mask": "blocks", "atm": "layers"}


def _few(keys, n: int = _SHOW) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _mmseg_head_kind(keys, prefix: str) -> Optional[str]:
    """``"mmseg_mask"``, ``"prune"`` or None for the mmseg head whose keys start with ``prefix``."""
    keys = set(keys)
    if prefix + "cls_emb" in keys and prefix + "dec_proj.weight" in keys:
        return "mmseg_mask"
    if prefix + "q.weight" in keys and _has_prefix(keys, prefix + "decoder.layers."):
        return "prune"
    return None


def _is_mmseg_vit(keys) -> bool:
    return any(re.fullmatch(r"backbone\.layers\.\d+\.attn\.attn\.in_proj_weight", k) for k in keys)


def detect_format(state: dict[str, Any]) -> str:
    """The checkpoint format of ``state``: one of :data:`FORMATS`, else a :class:`CheckpointError`."""
    keys = list(state)
    if _has_prefix(keys, "backbone.vit."):
        return "dtop"
    if "encoder.patch_embed.proj.weight" in state and _has_prefix(keys, "encoder.blocks.") \
            and _has_prefix(keys, "decoder."):
        return "segmenter"
    if _is_mmseg_vit(keys):
        kind = _mmseg_head_kind(keys, "decode_head.")
        if kind == "mmseg_mask":
            return "mmseg_segmenter"
        if kind == "prune":
            return "mmseg_segvit"
        head = sorted(k for k in keys if k.startswith("decode_head."))
        raise CheckpointError(
            "the checkpoint has an mmseg ViT backbone but a decode head dtop cannot convert (supported: "
            "SegmenterMaskTransformerHead -> 'mmseg_segmenter', DToP PruneHead -> 'mmseg_segvit'); "
            f"its decode_head keys: {_few(head) or 'none'}")
    raise CheckpointError(
        f"unknown checkpoint format ({len(keys)} keys, e.g. {_few(sorted(keys))}); dtop converts {', '.join(FORMATS)}: "
        "dtop ('backbone.vit.*', 'heads.*'), official Segmenter ('encoder.*', 'decoder.*'), mmseg ViT "
        "('backbone.layers.{i}.attn.attn.in_proj_weight', ...) with a Segmenter mask head or DToP PruneHeads "
        "('decode_head.*', 'auxiliary_head.{i}.*')")


class _Conversion:
    """One conversion: fills ``out`` (our key -> tensor) and the report."""

    def __init__(self, state: dict[str, Tensor], model: nn.Module, fmt: str,
                 src_grid: Optional[tuple[int, int]], grids: Optional[dict[str, tuple[int, int]]] = None) -> None:
        self.state = state
        self.model = model
        self.fmt = fmt
        self.src_grid = src_grid
        self.grids = grids or {}  # grids a dtop checkpoint records (or its model_config implies), by key
        self.own = model.state_dict()
        self.out: dict[str, Tensor] = {}
        self.origin: dict[str, str] = {}  # our key -> source key
        self.dropped: list[str] = []
        self.unknown: list[str] = []
        self.resampled: list[str] = []
        self.folded: list[str] = []
        self.lossy: list[str] = []
        self.notes: list[str] = []
        self.heads: dict[str, str] = {}  # our head prefix -> source prefix

    def check_eps(self, module: nn.Module, kind: str, where: str) -> None:
        """Note LayerNorms whose eps differs from the source's (not convertible; small output change)."""
        src = _SOURCE_EPS[kind]
        eps = sorted({m.eps for m in module.modules() if isinstance(m, nn.LayerNorm) and m.eps != src})
        if eps:
            self.notes.append(f"{where}: LayerNorm eps {', '.join(f'{e:g}' for e in eps)} in the model vs {src:g} "
                              f"in the checkpoint's {kind} modules; outputs differ slightly until fine-tuned")

    # ------------------------------------------------------------------ mapping
    def named(self, ours: str) -> str:
        src = self.origin.get(ours, ours)
        return ours if src == ours else f"{ours} (from {src})"

    def put(self, ours: str, value: Tensor, src: str) -> None:
        if ours in self.out:
            raise CheckpointError(f"two checkpoint keys map to {ours}: {self.origin[ours]} and {src}")
        self.out[ours] = value
        self.origin[ours] = src

    def apply_rules(self, src_prefix: str, our_prefix: str, rules: list[Rule], keys: list[str]) -> None:
        for key in keys:
            sub = key[len(src_prefix):]
            for pattern, template, transform in rules:
                m = re.fullmatch(pattern, sub)
                if m is None:
                    continue
                if template is None:
                    self.dropped.append(key)
                    break
                ours = our_prefix + m.expand(template)
                value = self.state[key]
                if transform == "transpose":
                    value = value.t()
                elif transform == "unsqueeze0":
                    value = value.unsqueeze(0)
                elif transform == "pos_embed":
                    value = self.resample_pos_embed(ours, value)
                if transform == "split3":
                    if value.shape[0] % 3:
                        raise CheckpointError(f"{key} has {value.shape[0]} rows, not a multiple of 3 (fused q, k, v)")
                    for name, part in zip("qkv", value.chunk(3, dim=0)):
                        self.put(ours.format(name), part, key)
                else:
                    self.put(ours, value, key)
                break
            else:
                self.unknown.append(key)

    def map_head(self, kind: str, src_prefix: str, stage: int) -> None:
        """Map the source head ``kind`` at ``src_prefix`` to our stage head ``stage``."""
        S = len(self.model.heads)
        head_types = [s.head for s in self.model.cfg.stages]
        want = _HEAD_TYPE[kind]
        where = "final stage" if stage == S - 1 else f"stage {stage}"
        if head_types[stage] != want:
            raise CheckpointError(
                f"checkpoint head {src_prefix.rstrip('.')} is a{'n' if want == 'atm' else ''} {want!r} head "
                f"({kind}) but the model's {where} head (heads.{stage}) is {head_types[stage]!r}; build the model "
                f"with a {want!r} head there (e.g. a {'segvit' if want == 'atm' else 'segmenter'}_* preset)")
        keys = [k for k in self.state if k.startswith(src_prefix)]
        src_layers = {int(m.group(1)) for k in keys if (m := re.match(_LAYER_SRC[kind], k[len(src_prefix):]))}
        ours = len(getattr(self.model.heads[stage], _LAYER_OURS[want]))
        if len(src_layers) != ours:
            raise CheckpointError(
                f"checkpoint head {src_prefix.rstrip('.')} has {len(src_layers)} decoder layers, the model's "
                f"heads.{stage} has {ours}; build the model with head_kwargs={{'num_layers': {len(src_layers)}}} "
                f"for that stage")
        self.heads[f"heads.{stage}."] = src_prefix
        self.check_eps(self.model.heads[stage], kind, f"heads.{stage}")
        self.apply_rules(src_prefix, f"heads.{stage}.", _HEAD_RULES[kind], keys)

    def map_backbone(self, style: str, src_prefix: str) -> None:
        keys = [k for k in self.state if k.startswith(src_prefix)]
        layer_re = r"blocks\.(\d+)\." if style == "segmenter" else r"layers\.(\d+)\."
        n = len({int(m.group(1)) for k in keys if (m := re.match(layer_re, k[len(src_prefix):]))})
        depth = len(self.model.backbone.blocks)
        if n != depth:
            raise CheckpointError(f"the checkpoint's backbone has {n} blocks, the model's {depth} "
                                  f"({self.model.cfg.backbone}); use a backbone of the same depth")
        self.check_eps(self.model.backbone.vit, style, "backbone")
        self.apply_rules(src_prefix, "backbone.vit.", _BACKBONE_RULES[style], keys)

    # ------------------------------------------------------------------ tensors
    def resample_pos_embed(self, ours: str, pos: Tensor) -> Tensor:
        """Source position embeddings (1, prefix + rows*cols, C) -> the model's grid, resampled from their true
        grid: ``src_grid``, else the one the dtop checkpoint records, else a square one. A non-square table of
        unknown grid is a CheckpointError asking for ``src_grid`` (equal counts are not equal shapes: 15x20 and
        20x15 both hold 300); a downsampling resampling is listed in ``lossy``."""
        if ours not in self.own:
            return pos
        vit = self.model.backbone.vit
        new_grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        P_model = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
        if self.fmt == "dtop":
            P_src = P_model
        else:  # Segmenter / mmseg keep the CLS (and DeiT dist) position in pos_embed
            P_src = 1 + int("encoder.dist_token" in self.state)
        if pos.dim() != 3 or pos.shape[1] <= P_src:
            raise CheckpointError(f"{self.origin.get(ours, 'pos_embed')}: unexpected position embedding "
                                  f"shape {tuple(pos.shape)}")
        if P_src != P_model:
            if P_model != 0:
                raise CheckpointError(f"the checkpoint's position embeddings hold {P_src} prefix position(s), "
                                      f"the model's {P_model}")
            pos = pos[:, P_src:]
            self.notes.append(f"{ours}: dropped the checkpoint's {P_src} prefix position(s) "
                              f"(the model adds no position embedding to its prefix tokens)")
        grid = self.src_grid if self.src_grid is not None else self.grids.get(ours)
        old_grid = source_grid(pos.shape[1] - P_model, grid, f"the checkpoint's {self.origin.get(ours, ours)}",
                               "pass src_grid=(rows, cols) to load_into / convert_state_dict")
        pos, what, lossy = resample_positions(pos, old_grid, new_grid, P_model, ours,
                                              int(vit.patch_embed.patch_size[0]))
        self.resampled += [what] if what else []
        self.lossy += [lossy] if lossy else []
        return pos

    def fix_qkv_biases(self) -> None:
        """Fused qkv biases the model's block lacks are folded (exactly for k and v), and missing
        source biases the model has are zero-filled (exact)."""
        for key in sorted(k for k in self.out if k.endswith("attn.qkv.bias") and k not in self.own):
            prefix = key[: -len("qkv.bias")]
            bias = self.out.pop(key)
            src = self.origin.pop(key)
            bq, bk, bv = bias.chunk(3)
            pw, pb = prefix + "proj.weight", prefix + "proj.bias"
            if pw in self.out and pb in self.out:
                # (softmax(.) @ (V + 1 bv^T)) W^T = softmax(.) @ V W^T + 1 (W bv)^T: rows of softmax sum to 1
                self.out[pb] = self.out[pb] + self.out[pw].to(bv.dtype) @ bv
                how = "v bias folded into proj.bias"
            else:
                how = "v bias dropped (no proj bias to fold into)"
                if bv.abs().max() > 0:
                    self.lossy.append(f"{src}: non-zero v bias dropped")
            self.folded.append(f"{src}: the model's block has no qkv bias; k bias dropped (softmax-invariant), {how}")
            self.dropped.append(src)
            if bq.abs().max() > 0:
                self.lossy.append(f"{src}: non-zero q bias dropped (max |b_q| = {bq.abs().max().item():.3g}); "
                                  f"outputs differ from the source model until fine-tuned")
        for key in sorted(k for k in self.out if k.endswith("attn.qkv.weight")):
            bias = key[: -len("weight")] + "bias"
            if bias in self.own and bias not in self.out:
                self.out[bias] = torch.zeros(self.out[key].shape[0], dtype=self.out[key].dtype)
                self.origin[bias] = f"(zeros: {self.origin[key]} has no bias)"
                self.notes.append(f"{bias}: zero-filled (the checkpoint's attention has no qkv bias)")

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        if self.unknown:
            raise CheckpointError(
                f"keys the {self.fmt!r} converter does not recognise ({len(self.unknown)}): {_few(self.unknown)}; "
                f"if this is another format, pass fmt= explicitly (one of {', '.join(FORMATS)})")
        unexpected = [k for k in self.out if k not in self.own]
        if unexpected:
            raise CheckpointError(
                f"checkpoint weights the model has no place for ({len(unexpected)}): "
                f"{_few(self.named(k) for k in unexpected)}")
        bad = [k for k in self.out if self.out[k].shape != self.own[k].shape]
        if bad:
            lines = [f"{self.named(k)}: checkpoint {tuple(self.out[k].shape)} vs model "
                     f"{tuple(self.own[k].shape)}" for k in bad]
            hint = ""
            cls_keys = [k for k in bad if re.search(r"\.(cls_emb|query|mask_norm\.(weight|bias))$", k)]
            if cls_keys:
                k = cls_keys[0]
                n_src = self.out[k].shape[-1] if "mask_norm" in k else self.out[k].shape[-2]
                hint = (f". The checkpoint has {n_src} classes, the model {self.model.num_classes}: build the model "
                        f"with num_classes={n_src} to load it (then adapt the class-specific parameters)")
            raise CheckpointError(f"shape mismatch ({len(bad)}): " + "; ".join(lines[:_SHOW])
                                  + (f"; ... ({len(lines) - _SHOW} more)" if len(lines) > _SHOW else "") + hint)

    def initialised(self) -> list[str]:
        """Our module prefixes the checkpoint provides nothing for (whole heads, the final norm)."""
        groups = [f"heads.{s}." for s in range(len(self.model.heads))] + ["backbone.vit.norm."]
        result = []
        for g in groups:
            own = [k for k in self.own if k.startswith(g)]
            if own and not any(k in self.out for k in own):
                result.append(g)
        if "backbone.vit.norm." in result and getattr(self.model.cfg, "final_norm", False):
            self.notes.append("the checkpoint has no final backbone LayerNorm but the model applies one before "
                              "its last head (final_norm=True); it starts at its initialisation")
        return result

    def report(self) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "converted": sorted(self.out),
            "initialised": self.initialised(),
            "dropped": sorted(self.dropped),
            "heads": dict(sorted(self.heads.items())),
            "resampled": self.resampled,
            "folded": self.folded,
            "lossy": self.lossy,
            "notes": self.notes,
        }


def _map_dtop(conv: _Conversion) -> None:
    """dtop's own keys: taken as they are, the position embeddings resampled to the model's grid."""
    for key, value in conv.state.items():
        if key == "backbone.vit.pos_embed":
            conv.origin[key] = key
            value = conv.resample_pos_embed(key, value)
        conv.put(key, value, key)
    for s in range(len(conv.model.heads)):
        if _has_prefix(conv.state, f"heads.{s}."):
            conv.heads[f"heads.{s}."] = f"heads.{s}."


def _map_segmenter(conv: _Conversion) -> None:
    """Official Segmenter: ``encoder.*`` -> the backbone, the ``decoder.*`` mask transformer -> the final head."""
    state = conv.state
    dec = [k for k in state if k.startswith("decoder.")]
    if not _has_prefix(state, "encoder.blocks.") or not dec:
        raise CheckpointError(f"format 'segmenter' needs 'encoder.*' and 'decoder.*' keys; "
                              f"got {_few(sorted(state))}")
    if "decoder.head.weight" in state:
        raise CheckpointError(
            "the Segmenter checkpoint has a linear decoder (decoder.head); dtop converts the mask-transformer "
            "decoder only (its linear head adds a LayerNorm the source lacks)")
    if "decoder.cls_emb" not in state:
        raise CheckpointError(f"the Segmenter checkpoint's decoder is not a mask transformer "
                              f"(no decoder.cls_emb); its keys: {_few(dec)}")
    conv.map_backbone("segmenter", "encoder.")
    conv.map_head("segmenter_mask", "decoder.", len(conv.model.heads) - 1)
    conv.unknown += [k for k in state if not k.startswith(("encoder.", "decoder."))]


def _map_mmseg(conv: _Conversion) -> None:
    """mmseg ViT backbone with a Segmenter mask head or DToP PruneHeads (``decode_head``, ``auxiliary_head.i``)."""
    state, fmt, final = conv.state, conv.fmt, len(conv.model.heads) - 1
    if not _is_mmseg_vit(state):
        raise CheckpointError(f"format {fmt!r} needs an mmseg ViT backbone "
                              f"('backbone.layers.{{i}}.attn.attn.in_proj_weight'); keys: {_few(sorted(state))}")
    conv.map_backbone("mmseg", "backbone.")
    want = "mmseg_mask" if fmt == "mmseg_segmenter" else "prune"
    if _mmseg_head_kind(state, "decode_head.") != want:
        raise CheckpointError(
            f"format {fmt!r} expects a {'SegmenterMaskTransformerHead' if want == 'mmseg_mask' else 'PruneHead'} "
            f"in decode_head; its keys: {_few(sorted(k for k in state if k.startswith('decode_head.')))}")
    conv.map_head(want, "decode_head.", final)
    handled = ("backbone.", "decode_head.", "auxiliary_head.")
    _map_mmseg_auxiliary(conv, final)
    for key in state:
        if key.startswith("data_preprocessor."):
            conv.dropped.append(key)
        elif not key.startswith(handled):
            conv.unknown.append(key)


def _map_mmseg_auxiliary(conv: _Conversion, final: int) -> None:
    """``auxiliary_head.i`` PruneHeads -> stage head i (mmseg_segvit); any other auxiliary head is dropped."""
    aux_keys = [k for k in conv.state if k.startswith("auxiliary_head.")]
    if not aux_keys:
        return
    indexed = sorted({int(m.group(1)) for k in aux_keys if (m := re.match(r"auxiliary_head\.(\d+)\.", k))})
    prefixes = [f"auxiliary_head.{i}." for i in indexed] if indexed else ["auxiliary_head."]
    for i, prefix in enumerate(prefixes):
        stage = indexed[i] if indexed else 0
        if conv.fmt == "mmseg_segvit" and _mmseg_head_kind(conv.state, prefix) == "prune":
            if stage >= final:
                raise CheckpointError(
                    f"checkpoint head {prefix.rstrip('.')} belongs to auxiliary stage {stage}, but the model "
                    f"has {final} auxiliary stage(s) (stages before the final head); build it with "
                    f"{len(prefixes) + 1} stages")
            conv.map_head("prune", prefix, stage)
        else:
            conv.dropped += [k for k in aux_keys if k.startswith(prefix)]
            conv.notes.append(f"{prefix.rstrip('.')}: an auxiliary head dtop does not use; dropped")


def convert_state_dict(state: dict[str, Tensor], model: nn.Module, fmt: str = "auto", *,
                       src_grid: Optional[tuple[int, int]] = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Map a checkpoint's ``state`` to ``model``'s (a :class:`~dtop.DToPSegmentor`) parameter names.

    fmt: ``"auto"`` (:func:`detect_format`) or one of :data:`FORMATS`.
    src_grid: the checkpoint's patch grid (rows, cols) (training image size / patch size); needed when its
    position table is not square and ``state`` does not record it. A full dtop checkpoint (``model`` with
    ``pos_grid`` or ``model_config``) records it; its bare state dict does not.

    Returns ``(converted, report)``: ``converted`` holds our keys (fused q/k/v split where ours are
    separate, mmseg ``Linear`` projections transposed to Segmenter's matrices, the ATM query
    reshaped to (1, K, d), position embeddings resampled from their grid to the model's); ``report`` has
    ``format``, ``converted`` (our keys), ``initialised`` (our key prefixes the checkpoint has
    nothing for, e.g. ``"heads.0."``: left at their initialisation), ``dropped`` (source keys not
    used: classifiers, loss buffers, unused heads, folded biases), ``heads`` (our head prefix ->
    source prefix), ``resampled``, ``folded``, ``lossy`` (approximations; a warning is issued too)
    and ``notes``. Raises :class:`CheckpointError` for unknown keys, weights the model has no place
    for, shape mismatches (naming the key and both shapes) and a non-square position table of unknown grid.
    """
    grids = recorded_grids(state)
    state = unwrap_state_dict(dict(state), source="the checkpoint")
    if fmt == "auto":
        fmt = detect_format(state)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose 'auto' or one of {', '.join(FORMATS)}")
    if not hasattr(model, "heads") or not hasattr(model, "backbone"):
        raise CheckpointError(f"convert_state_dict needs a DToPSegmentor, got {type(model).__name__}")
    conv = _Conversion(state, model, fmt, src_grid, grids)
    {"dtop": _map_dtop, "segmenter": _map_segmenter}.get(fmt, _map_mmseg)(conv)
    conv.fix_qkv_biases()
    conv.check()
    report = conv.report()
    for msg in report["lossy"]:
        warnings.warn(f"checkpoint conversion is approximate: {msg}", stacklevel=2)
    return conv.out, report


def load_into(model: nn.Module, path_or_state: Union[str, Path, dict], fmt: str = "auto", *,
              src_grid: Optional[tuple[int, int]] = None) -> dict[str, Any]:
    """Read a checkpoint (path to ``.pth``/``.safetensors`` or an in-memory state dict), convert it
    with :func:`convert_state_dict` and load it into ``model``. Returns the conversion report.

    ``src_grid``: see :func:`convert_state_dict`; position tables are resampled from their true grid and
    lossy (downsampling) resamplings are listed in ``report["lossy"]`` with a warning.
    Every parameter of the model must come from the checkpoint, except those under
    ``report["initialised"]`` (heads the checkpoint lacks); otherwise a :class:`CheckpointError`
    lists the missing keys and nothing is loaded.
    """
    if isinstance(path_or_state, (str, Path)):
        state = read_file(path_or_state)  # whole: a dtop checkpoint records its position grid beside the weights
        source = str(path_or_state)
        unwrap_state_dict(state, source=source)  # an error naming the file if it holds no state dict
    elif isinstance(path_or_state, dict):
        state = path_or_state
        source = "the state dict"
    else:
        raise CheckpointError(f"load_into takes a file path or a state dict, got {type(path_or_state).__name__}")
    converted, report = convert_state_dict(state, model, fmt, src_grid=src_grid)
    own = model.state_dict()
    skip = tuple(report["initialised"])
    missing = sorted(k for k in own if k not in converted and not (skip and k.startswith(skip)))
    if missing:
        raise CheckpointError(
            f"{source} ({report['format']}) lacks weights the model needs ({len(missing)}): {_few(missing)}")
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:  # check() rules this out; kept as a guard
        raise CheckpointError(f"unexpected keys after conversion: {_few(result.unexpected_keys)}")
    return report


__all__ = ["FORMATS", "detect_format", "convert_state_dict", "load_into"]
