"""Pretrained backbone weights: named sources dtop fetches and converts (:mod:`.registry`) and the ONNX ->
timm converter for HF ``Dinov2Model``/``ViTModel`` exports (:mod:`.onnx_vit`, :mod:`.convert`)."""
from .convert import convert_onnx_file
from .onnx_vit import OnnxViT, read_onnx_vit
from .registry import (WEIGHTS, WeightSource, cache_dir, fetch, get_source, is_registered, list_weights, resolve,
                       weight_file)

__all__ = ["WEIGHTS", "WeightSource", "OnnxViT", "cache_dir", "convert_onnx_file", "fetch", "get_source",
           "is_registered", "list_weights", "read_onnx_vit", "resolve", "weight_file"]
