"""Evaluation: whole-image or sliding-window inference, mIoU from a dataset-wide histogram
(as mmsegmentation computes it), per-image GFLOPs and exit fractions."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import load_checkpoint
from ..config import EvalSection, ExperimentConfig, config_from_dict
from ..errors import ConfigError, Interrupted, deferred_interrupts
from ..flops import dense_flops, forward_gflops
from ..jsonio import dumps, write_json
from ..models import DToPSegmentor, ReducedSegmentor, load_model
from ..models.segmentor import upsample_scores
from .common import experiment_dataset, init_distributed, progress_enabled, resolve_device
from .shards import ImageResult, PartialResults, barrier, combine, gather_results, world


@dataclass
class Prediction:
    """scores: (K, H, W) at the image's size (argmax = prediction); gflops: this image's total;
    exit_fractions: (S,); exit_map: (H, W) long, the stage that finalised each pixel's token (overlapping
    windows: the last). ``logits`` is a deprecated name of ``scores``."""

    scores: Tensor
    gflops: float
    exit_fractions: Tensor
    exit_map: Optional[Tensor] = None
    dense_gflops: float = 0.0  # the dense model's GFLOPs on the same crops (analytic)

    @property
    def logits(self) -> Tensor:
        """Deprecated name of :attr:`scores`."""
        warnings.warn("Prediction.logits is deprecated; use .scores", DeprecationWarning, stacklevel=2)
        return self.scores

    def label_map(self, size: Sequence[int]) -> Tensor:
        """(H, W) predicted classes at ``size`` (scores upsampled bilinearly first), on the CPU."""
        scores = self.scores
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = upsample_scores(scores[None].float(), tuple(size))[0]
        return scores.argmax(0).cpu()

    def exit_stages(self, size: Sequence[int]) -> Tensor:
        """(H, W) exit stage of every pixel at ``size`` (nearest), on the CPU."""
        return F.interpolate(self.exit_map[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long().cpu()


def _windows(H: int, W: int, window: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """mmseg-style sliding windows (y1, y2, x1, x2) over an H x W image: every pixel lies in at least one
    window, the last row and column of windows aligned to the far edges (mmsegmentation's slide_inference).
    A stride larger than the window is taken as the window (:meth:`EvalSection.check_windows` refuses it
    before this is reached)."""
    wh, ww = min(window[0], H), min(window[1], W)
    sh, sw = min(stride[0], wh), min(stride[1], ww)
    rows = max(H - wh + sh - 1, 0) // sh + 1
    cols = max(W - ww + sw - 1, 0) // sw + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y1 = min(r * sh, H - wh)
            x1 = min(c * sw, W - ww)
            out.append((y1, y1 + wh, x1, x1 + ww))
    return out


def _pad_to(x: Tensor, multiple: int) -> Tensor:
    H, W = x.shape[-2:]
    return F.pad(x, (0, (-W) % multiple, 0, (-H) % multiple))


@torch.no_grad()
def predict(model, image: Tensor, ecfg: EvalSection, dense: bool = False, max_batch: int = 8) -> Prediction:
    """Scores for one normalised image (3, H, W). ``dense`` runs the plain model (no auxiliary heads).
    Slide mode: ConfigError for a window or stride that :meth:`EvalSection.check_windows` refuses."""
    H, W = image.shape[-2:]
    p = model.backbone.patch_size
    if ecfg.mode == "slide":
        ecfg.check_windows()
    boxes = [(0, H, 0, W)] if ecfg.mode == "whole" else _windows(H, W, ecfg.window, ecfg.stride)
    crops = torch.stack([_pad_to(image[:, y1:y2, x1:x2], p) for y1, y2, x1, x2 in boxes])
    K, S = model.num_classes, model.num_stages
    summed = image.new_zeros(K, H, W)
    count = image.new_zeros(1, H, W)
    exit_map = torch.full((H, W), S - 1, dtype=torch.long, device=image.device)
    gflops = dense_gflops = 0.0
    exits = torch.zeros(S)
    for start in range(0, len(boxes), max_batch):
        chunk = crops[start:start + max_batch]
        stage_maps = None
        dense_gflops += len(chunk) * dense_flops(model, tuple(chunk.shape[-2:]), final_head_only=True) / 1e9
        if dense:
            scores = model.forward_dense(chunk)
            gflops = dense_gflops
            exits[-1] += len(chunk)
        else:
            out = model(chunk)
            scores = out.scores
            gflops += float(forward_gflops(model, out).sum())
            exits += out.exit_fractions().sum(0).cpu()
            stage_maps = F.interpolate(out.exit_stage[:, None].float(), size=chunk.shape[-2:], mode="nearest")[:, 0]
        for j, ((y1, y2, x1, x2), lg) in enumerate(zip(boxes[start:start + max_batch], scores)):
            summed[:, y1:y2, x1:x2] += lg[:, : y2 - y1, : x2 - x1].float()
            count[:, y1:y2, x1:x2] += 1
            if stage_maps is not None:
                exit_map[y1:y2, x1:x2] = stage_maps[j, : y2 - y1, : x2 - x1].long()
    return Prediction(summed / count, gflops, exits / len(boxes), exit_map, dense_gflops)


def intersection_union(hist: Tensor) -> dict[str, Any]:
    """Metrics from a (K, K) histogram hist[label, prediction]: IoU per class (NaN where the class occurs
    in neither labels nor predictions), Acc per class (NaN where it never occurs in labels), their nan-means,
    and overall pixel accuracy; all NaN for an empty histogram (no labelled pixel)."""
    hist = hist.double()
    tp = hist.diag()
    union = hist.sum(0) + hist.sum(1) - tp
    iou = tp / union  # 0/0 -> NaN for absent classes
    acc = tp / hist.sum(1)
    return {"iou": iou, "acc": acc, "miou": float(torch.nanmean(iou)), "macc": float(torch.nanmean(acc)),
            "aacc": float(tp.sum() / hist.sum())}


def update_histogram(hist: Tensor, pred: Tensor, label: Tensor, ignore_index: int = 255) -> None:
    K = hist.shape[0]
    valid = label != ignore_index
    hist += torch.bincount(label[valid] * K + pred[valid], minlength=K * K).reshape(K, K).to(hist)


def evaluate(model, dataset, ecfg: EvalSection, device: torch.device, dense: bool = False,
             progress: bool = False, desc: str = "eval", partial: Optional[Path] = None,
             fingerprint: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``model`` on ``dataset``; returns (metrics, per-image rows). Percentages; None where a figure
    is undefined (a class in neither labels nor predictions; every figure when no pixel is labelled, which
    also warns: :func:`warn_unlabelled`). ConfigError when the dataset's classes are not the model's or no
    image would be evaluated (:func:`check_evaluable`).

    Under ``torchrun`` (a process group) every rank evaluates its share of the images and every rank returns
    the whole result, equal to one process's. ``partial``: a folder that keeps each image's result as it is
    done (:class:`~dtop.engine.shards.PartialResults`, ``fingerprint`` naming what is evaluated), so a rerun
    after an interruption resumes; the caller removes it once the results are written."""
    model.eval().to(device)
    K = model.num_classes
    n = check_evaluable(model, dataset, ecfg)
    rank, size = world()
    store = PartialResults(partial, {**(fingerprint or {}), "images": n, "desc": desc}, rank)
    done = {i: r for i, r in store.load().items() if i < n}
    barrier()
    store.start(resumed=bool(done))
    todo = [i for i in range(n) if i not in done][rank::size]
    bar = tqdm(total=n, initial=len(done), desc=desc, disable=not progress, unit="image")
    before = store.loaded_lines if done else 0  # lines on disk before this run (resumed images, lines cut short)

    def images_done() -> int:  # images done by every rank, for rank 0's one progress bar
        return len(done) + store.count() - before if size > 1 and partial else bar.n + 1

    mine: list[ImageResult] = []
    try:
        for i in todo:
            mine.append(_image_result(model, dataset, i, ecfg, device, dense))
            store.append(mine[-1])
            bar.update(images_done() - bar.n)
        while size > 1 and partial and rank == 0 and images_done() < n:  # the others' images
            time.sleep(0.2)
            bar.update(images_done() - bar.n)
    finally:
        bar.close()
        store.close()
    hist, exit_sum, rows = combine([*done.values(), *gather_results(mine)], K, model.num_stages)
    if n and not int(hist.sum()):
        warn_unlabelled(dataset, n, desc)
    m = intersection_union(hist)
    names = list(getattr(dataset, "classes", [str(c) for c in range(K)]))
    metrics = {
        "miou": _pct(m["miou"]), "macc": _pct(m["macc"]), "aacc": _pct(m["aacc"]),
        "per_class_iou": {c: _pct(v) for c, v in zip(names, m["iou"])},
        "per_class_acc": {c: _pct(v) for c, v in zip(names, m["acc"])},
        "gflops": round(sum(r["gflops"] for r in rows) / max(1, len(rows)), 4),
        "exit_fractions": [round(float(f), 5) for f in exit_sum / max(1, len(rows))],
        "num_images": len(rows), "variant": variant_kind(model, dense),
        "p0": model.p0 if isinstance(model, DToPSegmentor) and not dense else None,
    }
    if isinstance(model, DToPSegmentor) and not dense:
        metrics["exit_mode"] = model.exit_mode
        if model.exit_mode == "budget":
            metrics.update(exit_ratio=model.exit_ratio, p_min=model.p_min, p0=None)
    return metrics, rows


def _image_result(model, dataset, i: int, ecfg: EvalSection, device: torch.device, dense: bool) -> ImageResult:
    """Image ``i`` of ``dataset`` predicted and scored: its row, exit fractions and histogram."""
    K = model.num_classes
    sample = dataset[i]
    label = sample["label"]
    pred_out = predict(model, sample["image"].to(device), ecfg, dense=dense)
    pred = pred_out.label_map(label.shape[-2:])
    hist = torch.zeros(K, K, dtype=torch.long)
    update_histogram(hist, pred, label, dataset.ignore_index)
    valid = label != dataset.ignore_index
    acc = round(float((pred[valid] == label[valid]).float().mean()), 5) if valid.any() else math.nan
    row = {"file": sample["name"], "gflops": round(pred_out.gflops, 4), "pixel_acc": acc,
           **{f"exit_s{s}": round(float(f), 5) for s, f in enumerate(pred_out.exit_fractions)}}
    return ImageResult.make(i, row, pred_out.exit_fractions, hist)


def check_evaluable(model, dataset, ecfg: EvalSection) -> int:
    """The number of images to evaluate (``eval.max_images`` of the dataset, all when None). ConfigError
    when the dataset has another number of classes than the model (naming both and the keys that set them)
    or when that number is 0."""
    K, D = model.num_classes, dataset.num_classes
    if D != K:
        raise ConfigError(f"the model predicts {K} classes but the dataset ({type(dataset).__name__}) has {D}; "
                          f"evaluate with the data settings the model was trained with (data.name, "
                          f"data.options num_classes / classes / palette / reduce_zero_label)")
    limit = ecfg.max_images
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"eval.max_images must be a positive number of images or null (all), got {limit!r}")
    n = len(dataset) if limit is None else min(len(dataset), limit)
    if n == 0:
        raise ConfigError(f"the evaluation dataset ({type(dataset).__name__}) holds no image")
    return n


def warn_unlabelled(dataset, n: int, desc: str = "eval") -> None:
    """A UserWarning that none of the ``n`` evaluated images has a labelled pixel (mIoU is undefined)."""
    ignore = getattr(dataset, "ignore_index", 255)
    warnings.warn(f"{desc}: no labelled pixel in {n} image(s): every label pixel is the ignore id {ignore}, so "
                  f"mIoU, mAcc and aAcc are undefined (null in metrics.json). The labels are probably read "
                  f"wrongly: check data.options label_mode (ids / rgb and its palette), reduce_zero_label, the "
                  f"ignore id, and that the label folder holds this split's masks", UserWarning, stacklevel=3)


def variant_kind(model, dense: bool) -> str:
    """``dense``, ``dtop``, or the name of the model's token-reduction alternative."""
    if dense:
        return "dense"
    return model.reducer.kind if isinstance(model, ReducedSegmentor) else "dtop"


def _pct(v) -> Optional[float]:
    """A fraction as a percentage rounded to 3 decimals; None where it is undefined (NaN)."""
    v = float(v)
    return None if math.isnan(v) else round(100 * v, 3)


def versions() -> dict[str, str]:
    return {"dtop": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def class_table(metrics: dict[str, Any]) -> str:
    """An mmsegmentation-style per-class table plus the summary line."""
    names = list(metrics["per_class_iou"])
    width = max(9, *(len(n) for n in names))
    line = f"+{'-' * (width + 2)}+-------+-------+"
    out = [line, f"| {'Class':^{width}} |  IoU  |  Acc  |", line]
    for n in names:
        iou, acc = metrics["per_class_iou"][n], metrics["per_class_acc"][n]
        out.append(f"| {n:>{width}} | {_fmt(iou)} | {_fmt(acc)} |")
    out.append(line)
    out.append(f"aAcc {_fmt(metrics['aacc'], 0)}  mIoU {_fmt(metrics['miou'], 0)}  mAcc {_fmt(metrics['macc'], 0)}  "
               f"GFLOPs {metrics['gflops']:.3f}  exits per stage {metrics['exit_fractions']}")
    return "\n".join(out)


def _fmt(v: Optional[float], width: int = 5) -> str:
    """``v`` with 2 decimals, or ``n/a`` where it is undefined (None or NaN)."""
    return f"{'n/a':>{width}}" if v is None or math.isnan(v) else f"{v:{width}.2f}"


def write_results(out_dir: Path, metrics: dict[str, Any], rows: list[dict[str, Any]], cfg: ExperimentConfig) -> None:
    """``metrics.json`` (with the resolved config and library versions) and ``per_image.csv``; a Ctrl-C or
    SIGTERM meanwhile waits until both are written."""
    with deferred_interrupts():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "metrics.json", {**metrics, "config": cfg.to_dict(), "versions": versions()})
        with open(out_dir / "per_image.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file"])
            writer.writeheader()
            writer.writerows(rows)


def eval_dir(checkpoint: str, out_dir: Optional[Path] = None) -> Path:
    """Where an evaluation writes: ``out_dir``, by default ``<checkpoint folder>/eval``."""
    return Path(out_dir) if out_dir is not None else Path(checkpoint).parent / "eval"


def _compiled(model, compile: bool):
    if compile:
        model.compile()
    return model


def run_evaluation(cfg: ExperimentConfig, checkpoint: str, p0s: Sequence[float], with_dense: bool = True,
                   out_dir: Optional[Path] = None, dense_checkpoint: Optional[str] = None,
                   verbose: bool = True, reduction=None, compile: bool = False,
                   budget: Optional[dict] = None) -> list[dict[str, Any]]:
    """Evaluate a checkpoint densely and at each p0; writes ``<out>/<variant>/{metrics.json,per_image.csv}``
    and ``<out>/summary.json``; returns the summary rows (name, p0, miou, gflops, reduction, exits).

    A checkpoint of a token-reduction alternative (or any checkpoint with ``reduction``, a
    :class:`~dtop.models.config.ReductionSpec`) is evaluated once under the alternative's name instead
    of at each p0; its dense row is the same weights without the reduction (or ``dense_checkpoint``).
    ``compile``: run every model through ``torch.compile`` (:meth:`~dtop.models.Segmentor.compile`).
    ``budget``: also evaluate DToP under the budget rule (``{"exit_ratio", "p_min"}`` for
    :meth:`~dtop.models.DToPSegmentor.set_budget`; ``{}``: the checkpoint's own), as variant ``dtop_budget_...``.
    ``cfg.eval.target_gflops`` (set by ``dtop calibrate``) is reported beside the achieved GFLOPs.
    Ctrl-C (or SIGTERM under the CLI): :class:`~dtop.errors.Interrupted` naming the variants written."""
    dist_info = init_distributed(cfg.train.device)
    device = resolve_device(cfg.train.device, dist_info)
    main = dist_info.is_main
    cfg = with_checkpoint_model(cfg, checkpoint, announce=main)
    out_dir = eval_dir(checkpoint, out_dir)
    dataset = experiment_dataset(cfg, cfg.data.val_split, train=False)
    models = {checkpoint: _compiled(load_model(checkpoint, device, reduction), compile)}
    variants, budget = _variants(models[checkpoint], checkpoint, p0s, with_dense, dense_checkpoint, budget)
    summary: list[dict[str, Any]] = []
    name = variants[0][0]
    try:
        for name, p0, ckpt in variants:
            model = models.get(ckpt) or _compiled(load_model(ckpt, device), compile)
            models[ckpt] = model
            if p0 is not None:
                model.set_p0(p0)
            elif name.startswith("dtop_budget"):
                model.set_budget(**budget)
            metrics = _evaluate_variant(cfg, model, dataset, device, name, ckpt, out_dir, dist_info, verbose)
            summary.append({"name": name, "p0": p0, "miou": metrics["miou"], "gflops": metrics["gflops"],
                            "exit_fractions": metrics["exit_fractions"], **_budget_fields(metrics),
                            **({"target_gflops": cfg.eval.target_gflops}
                               if cfg.eval.target_gflops is not None and name != "dense" else {})})
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under the CLI
        kept = PartialResults(out_dir / f"{name}.partial", {}).count()
        raise interrupted_evaluation(e, [r["name"] for r in summary], [v[0] for v in variants], out_dir,
                                     kept=kept) from e
    base = summary[0]["gflops"] if with_dense else None
    for row in summary:
        row["reduction_pct"] = round(100 * (1 - row["gflops"] / base), 2) if base else None
    if main:
        write_json(out_dir / "summary.json", summary)
    return summary


def _variants(model, checkpoint: str, p0s: Sequence[float], with_dense: bool, dense_checkpoint: Optional[str],
              budget: Optional[dict]) -> tuple[list[tuple[str, Optional[float], str]], Optional[dict]]:
    """The variants to evaluate, (name, p0, checkpoint) each, and the budget setting resolved."""
    variants: list[tuple[str, Optional[float], str]] = []
    if with_dense:
        variants.append(("dense", None, dense_checkpoint or checkpoint))
    if isinstance(model, ReducedSegmentor):
        return variants + [(model.reducer.kind, None, checkpoint)], budget
    variants += [(f"dtop_p0_{p:g}", float(p), checkpoint) for p in p0s]
    if budget is not None:
        budget = resolved_budget(model, budget)
        variants.append((budget_variant(budget), None, checkpoint))
    return variants, budget


def _evaluate_variant(cfg: ExperimentConfig, model, dataset, device, name: str, ckpt: str, out_dir: Path,
                      dist_info, verbose: bool) -> dict[str, Any]:
    """One variant's metrics: read back when ``out_dir/name`` holds a finished evaluation of the same
    fingerprint, else evaluated (resuming from ``<name>.partial``) and written by rank 0."""
    main = dist_info.is_main
    run = fingerprint(cfg, ckpt, name, model)
    metrics = finished(out_dir / name, run)
    if metrics is None:
        metrics, rows = evaluate(model, dataset, cfg.eval, device, dense=name == "dense",
                                 progress=progress_enabled(dist_info), desc=name,
                                 partial=out_dir / f"{name}.partial", fingerprint=run)
        metrics["checkpoint"], metrics["run"] = str(ckpt), run
        # also relative to the metrics file, so a report finds it from any folder (and after the two move together)
        metrics["checkpoint_relative"] = os.path.relpath(os.path.abspath(ckpt), os.path.abspath(out_dir / name))
        metrics["model_config"] = model.cfg.to_dict()  # what ran (the checkpoint's, with this variant's rule)
        if main:
            write_results(out_dir / name, metrics, rows, cfg)
            PartialResults(out_dir / f"{name}.partial", run).remove()
        barrier()
    elif verbose and main:
        print(f"\n== {name}: done already ({out_dir / name / 'metrics.json'}, the same checkpoint and settings)")
    if verbose and main:
        print(f"\n== {name} ({metrics['num_images']} images)\n{class_table(metrics)}")
    if main and name != "dense" and metrics.get("variant") == "dtop" and not sum(metrics["exit_fractions"][:-1]):
        print(f"dtop eval: note: {name}: no token exited before the final stage, so it costs what dense does plus "
              f"its auxiliary heads (a dense-trained checkpoint, or p0 too high for its heads): fine-tune with "
              f"train.scheme=finetune, or try a lower --p0", file=sys.stderr)
    return metrics


def with_checkpoint_model(cfg: ExperimentConfig, checkpoint: str, announce: bool = True) -> ExperimentConfig:
    """``cfg`` with the checkpoint's own model section (what is evaluated is the checkpoint's model, whatever
    the config says) and, where the config leaves them unset, its normalisation (``data.mean``/``std``);
    prints a note on stderr when the config's model section differs (``announce``)."""
    recorded = load_checkpoint(checkpoint).get("config") or {}
    model, data = recorded.get("model"), recorded.get("data") or {}
    out = copy.deepcopy(cfg)
    if model:
        ran = config_from_dict({"model": model}).model
        if asdict(ran) != asdict(cfg.model) and announce:
            print(f"dtop eval: note: the config's model section ({_model_text(asdict(cfg.model))}) differs from "
                  f"the checkpoint's ({_model_text(asdict(ran))}); evaluating the checkpoint's model, as it was "
                  f"trained (metrics.json records it)", file=sys.stderr)
        out.model = ran
    if out.data.mean is None and out.data.std is None and data.get("mean") and data.get("std"):
        out.data.mean, out.data.std = list(data["mean"]), list(data["std"])
    return out


def _model_text(d: dict[str, Any]) -> str:
    extra = f", overrides {d['overrides']}" if d.get("overrides") else ""
    return f"preset {d['preset']}{extra}"


def fingerprint(cfg: ExperimentConfig, checkpoint: str, variant: str, model) -> dict[str, Any]:
    """What an evaluation's results depend on: the checkpoint file (path, size, modification time), the
    variant and its exit rule, the data and eval settings, dtop's version. Equal fingerprints: the results
    on disk can be reused (a finished variant) or resumed (its partial per-image results)."""
    stat = Path(checkpoint).stat()
    rule = model.exit_rule() if isinstance(model, DToPSegmentor) and variant != "dense" else None
    rules = ("p0", "exit_mode", "exit_ratio", "p_min", "target_gflops")  # which variants run, not what they give
    settings = {k: v for k, v in asdict(cfg.eval).items() if k not in rules}
    return {"checkpoint": str(checkpoint), "checkpoint_bytes": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
            "variant": variant, "rule": rule, "eval": settings, "data": asdict(cfg.data), "dtop": __version__}


def finished(folder: Path, run: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``metrics.json`` in ``folder`` when it was written by an evaluation of fingerprint ``run``, else None."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    same = metrics.get("run") == json.loads(dumps(run))
    return metrics if same and (folder / "per_image.csv").is_file() else None


def resolved_budget(model, budget: dict) -> dict:
    """``budget`` with the checkpoint's own ratios filled in where it is ``{}``; ConfigError when it has none."""
    if budget:
        return budget
    if getattr(model, "cfg", None) is None or model.cfg.exit_mode != "budget":
        raise ConfigError("budget mode: this checkpoint was not trained in budget mode, so it has no exit ratios; "
                          "give them with --exit-ratio R [R ...] (or eval.exit_ratio)")
    return {"exit_ratio": model.cfg.exit_ratio, "p_min": model.cfg.p_min}


def budget_variant(budget: dict) -> str:
    """``dtop_budget_0.5_0.1`` (``_pmin0.3`` with a floor): the variant name of a budget setting."""
    r = budget["exit_ratio"]
    name = "dtop_budget_" + "_".join(f"{v:g}" for v in (r if isinstance(r, (list, tuple)) else [r]))
    return name + (f"_pmin{budget['p_min']:g}" if budget.get("p_min") else "")


def _budget_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("exit_mode", "exit_ratio", "p_min") if metrics.get(k) is not None}


def interrupted_evaluation(exc: BaseException, finished: Sequence[str], names: Sequence[str], where: Path,
                           after: str = "summary.json not written", kept: int = 0) -> Interrupted:
    """The interruption ``exc`` of an evaluation of the variants ``names``, of which ``finished`` are written
    (``where/<variant>/metrics.json``); ``after``: what the finished run would also have written; ``kept``:
    images of the unfinished variant whose results are kept for a rerun to resume from."""
    if len(finished) >= len(names):
        return Interrupted.wrap(exc, f"all {len(names)} variants evaluated, in {where}/<variant>/; {after}")
    now = names[len(finished)]
    resume = (f"; {kept} image(s) of {now} kept in {where}/{now}.partial: the same command resumes"
              if kept else "")
    if not finished:
        return Interrupted.wrap(exc, f"stopped while evaluating {now}, the first of {len(names)} variants; "
                                     f"nothing written{resume}")
    return Interrupted.wrap(exc, f"evaluated {len(finished)} of {len(names)} variants ({', '.join(finished)}), "
                                 f"metrics in {where}/<variant>/metrics.json; {now} not finished, {after}{resume}")


def summary_table(rows: list[dict[str, Any]]) -> str:
    target = any(r.get("target_gflops") is not None for r in rows)
    out = ["| variant | p0 | mIoU | GFLOPs | " + ("target GFLOPs | " if target else "") + "reduction | "
           "tokens exited per stage |", "|---|---|---|---|" + ("---|" if target else "") + "---|---|"]
    for r in rows:
        red = "" if r.get("reduction_pct") is None else f"{r['reduction_pct']:.1f}%"
        exits = " / ".join(f"{100 * f:.1f}%" for f in r["exit_fractions"])
        goal = "" if r.get("target_gflops") is None else f"{r['target_gflops']:.3f}"
        out.append(f"| {r['name']} | {'' if r['p0'] is None else r['p0']} | {_fmt(r['miou'], 0)} | {r['gflops']:.3f} | "
                   + (f"{goal} | " if target else "") + f"{red} | {exits} |")
    return "\n".join(out)
