"""Export a trained segmentor with static shapes: ONNX (``torch.onnx.export``, the dynamo exporter) and
``torch.export`` programs.

What exports: the dense model, and DToP under the budget rule (``exit_mode`` ``budget`` without a
``p_min`` floor: every image keeps the same number of tokens, so every shape is fixed;
``docs/method/exit-rule.md``). The threshold rule gives each image its own kept-token count, a shape that
depends on the data, which a static ONNX graph cannot hold: it is refused, naming budget mode.

The exported graph takes normalised images (B, 3, H, W) float32 at the size it was exported for and
returns ``scores`` (B, K, H, W) (and, for DToP, ``exit_stage`` (B, h, w) int64, the stage that finalised
each token). The ONNX file's metadata records the classes, the normalisation and the exit rule.

Sorting: the context rule sorts with ties to the lower index (``aten.sort.stable``), which the ONNX
exporter has no translation for; ONNX's ``TopK`` over the whole axis breaks ties the same way (by the
lower index, the operator's specification), so :func:`_sort_stable` translates it to that.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..jsonio import dumps
from ..models import DToPSegmentor, ReducedSegmentor

FORMATS = ("onnx", "torch")


class ExportedSegmentor(nn.Module):
    """The graph that is exported: images (B, 3, H, W) -> scores (B, K, H, W) and, for DToP, the exit-stage
    map (B, h, w) int64. ``dense``: the plain model (every block, final head only)."""

    def __init__(self, model: nn.Module, dense: bool = False) -> None:
        super().__init__()
        self.model, self.dense = model, dense

    def forward(self, images: Tensor):
        if self.dense:
            return self.model.forward_dense(images)
        out = self.model(images)
        return out.scores, out.exit_stage


def check_exportable(model: nn.Module, dense: bool) -> None:
    """ConfigError when the model's forward has shapes that depend on the data (threshold exits, a budget
    with a ``p_min`` floor) or is a token-reduction alternative, naming what exports instead."""
    if dense:
        return
    if isinstance(model, ReducedSegmentor):
        raise ConfigError(f"the {model.reducer.kind} token reduction does not export; export the dense model "
                          f"(--dense)")
    if not isinstance(model, DToPSegmentor) or not model.can_exit():
        return
    if model.exit_mode == "threshold":
        raise ConfigError("threshold exits give every image its own number of kept tokens (shapes that depend on "
                          "the data), which a static graph cannot hold; export DToP in budget mode: "
                          "--exit-mode budget --exit-ratio R [R ...] (dtop calibrate picks R for a GFLOPs target), "
                          "or the dense model with --dense")
    if model.p_min > 0:
        raise ConfigError(f"a budget with a confidence floor (p_min {model.p_min:g}) exits a number of tokens that "
                          f"depends on the data; export with p_min 0 (--p-min 0)")


def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as ONNX ``TopK`` over the whole axis (ties: the lower index first, as stable)."""
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim, end=dim + 1) if dim >= 0 else op.Shape(self, start=dim)
    values, indices = op.TopK(self, k, axis=dim, largest=descending, sorted=True)
    return values, indices


@contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """Silence the ONNX graph optimiser's notes about constants it leaves unfolded (``Evaluation failed: ...``,
    ``Skipped deduplication ...``: warnings of onnxscript / onnx_ir that do not affect the exported graph, whose
    outputs the check compares with PyTorch's)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript.optimizer._constant_folding",
                                              "onnx_ir.passes.common.initializer_deduplication")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(model: nn.Module, path: Path, size: Sequence[int], batch: int = 1, dense: bool = False,
                metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model`` as ONNX (static shapes: ``batch`` images of ``size`` (H, W)) to ``path``, atomically;
    ``metadata`` goes into the file's metadata properties (values as JSON). Needs the ``onnx`` and
    ``onnxscript`` packages (ConfigError naming them when missing). ConfigError for a model that does not
    export (:func:`check_exportable`)."""
    check_exportable(model, dense)
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's translations)
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx and onnxscript packages ({e}); pip install onnx onnxscript") from e
    x = torch.zeros(batch, 3, *size)
    graph = ExportedSegmentor(model.eval(), dense).eval()
    outputs = ["scores"] if dense else ["scores", "exit_stage"]
    path = Path(path)

    def write(tmp: Path) -> None:
        with torch.no_grad(), _quiet_optimizer():
            program = torch.onnx.export(graph, (x,), dynamo=True, input_names=["images"], output_names=outputs,
                                        custom_translation_table={torch.ops.aten.sort.stable: _sort_stable},
                                        verbose=False)
        proto = program.model_proto
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, dumps(value)
        onnx.save(proto, str(tmp))

    _atomic(path, write)
    return path


def export_program(model: nn.Module, size: Sequence[int], batch: int = 1, dense: bool = False):
    """``torch.export.export`` of the model at ``batch`` images of ``size`` (H, W): an ExportedProgram whose
    ``module()`` computes what :class:`ExportedSegmentor` does. ConfigError as :func:`export_onnx`."""
    check_exportable(model, dense)
    with torch.no_grad():
        return torch.export.export(ExportedSegmentor(model.eval(), dense).eval(), (torch.zeros(batch, 3, *size),))


def save_program(model: nn.Module, path: Path, size: Sequence[int], batch: int = 1, dense: bool = False) -> Path:
    """:func:`export_program` saved with ``torch.export.save`` (a ``.pt2`` file), atomically."""
    program = export_program(model, size, batch, dense)
    path = Path(path)
    _atomic(path, lambda tmp: torch.export.save(program, str(tmp)))
    return path


def onnx_outputs(path: Path, images: Tensor) -> list:
    """Run an exported ONNX file with onnxruntime (CPU) on ``images`` (B, 3, H, W): its outputs as numpy
    arrays. ConfigError when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError("checking an ONNX export needs onnxruntime: pip install onnxruntime (or --no-check)") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.detach().cpu().numpy()})


def max_difference(model: nn.Module, path: Path, images: Tensor, dense: bool = False) -> dict[str, float]:
    """The largest absolute difference between PyTorch's scores and the ONNX file's on ``images``, and the
    share of exit-stage entries that differ (DToP)."""
    with torch.no_grad():
        ref = ExportedSegmentor(model.eval(), dense)(images)
    ref = (ref,) if dense else ref
    got = onnx_outputs(path, images)
    out = {"max_abs_diff": float((torch.from_numpy(got[0]) - ref[0].cpu()).abs().max())}
    if not dense:
        out["exit_stage_mismatch"] = float((torch.from_numpy(got[1]) != ref[1].cpu()).float().mean())
    return out
