"""Convert an ONNX export of an HF ViT backbone into a timm safetensors file, checked by loading it strictly."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from ..checkpoint import check_and_load
from ..errors import CheckpointError
from .onnx_vit import read_onnx_vit

CONVERTER_VERSION = 1  # bump when the conversion changes: fetched files are then converted again


def convert_onnx_file(onnx_file: Union[str, Path], out: Union[str, Path], timm_model: str,
                      model_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Read the backbone of ``onnx_file`` (:func:`~dtop.weights.onnx_vit.read_onnx_vit`), load it strictly into
    ``timm.create_model(timm_model, num_classes=0, **model_kwargs)`` and save the state dict to ``out``
    (``.safetensors``, written atomically). Returns what the weights imply about the architecture.
    CheckpointError when they do not fit the timm model (listing missing/unexpected/misshapen keys)."""
    import timm
    from safetensors.torch import save_file

    if not timm.is_model(timm_model):
        raise CheckpointError(f"unknown timm model {timm_model!r}; see timm.list_models('vit_*')")
    vit = read_onnx_vit(onnx_file)
    model = timm.create_model(timm_model, pretrained=False, num_classes=0, **(model_kwargs or {}))
    check_and_load(model, vit.state, source=f"{onnx_file} (as timm {timm_model})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in vit.state.items()}, str(tmp),
                  metadata={"source": Path(onnx_file).name, "timm_model": timm_model})
        os.chmod(tmp, 0o644)  # save_file creates it owner-only
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"timm_model": timm_model, "graph_prefix": vit.prefix, "dropped": len(vit.dropped),
            "embed_dim": int(vit.embed_dim), "depth": vit.depth, "patch_size": int(vit.patch_size),
            "mlp_hidden": vit.mlp_hidden, "layer_scale": vit.layer_scale, "num_registers": vit.num_registers,
            "pos_grid": vit.pos_grid}
