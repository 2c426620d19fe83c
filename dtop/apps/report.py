"""``dtop report RUN_DIR`` (and ``dtop eval --figures``): the figures and a self-contained report.html.

RUN_DIR is the output of ``dtop eval`` (``summary.json`` and one folder per variant) or of
``dtop compare`` (``compare.json`` and ``eval/<variant>/``). Written to ``RUN_DIR/report/`` unless
told otherwise: ``figure1.png`` (per image: image, ground truth, dense, DToP, exit stages; images
across the range of savings), ``figure2.png`` (per-category IoU, dense vs DToP), ``sweep.png`` (mIoU
against GFLOPs, with the other methods' points), and ``report.html`` with the figures embedded, headed by
where they come from (checkpoint, dataset, number of images, dtop version).
Figure 1 reruns the dense and DToP checkpoints named in the metrics on the chosen validation images.
The pictured DToP variant is the one nearest p0 0.9 in which tokens leave early (``--p0`` picks one).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from .._version import __version__
from ..config import config_from_dict
from ..data import denormalize
from ..data.meta import trained_display_meta
from ..engine.common import experiment_dataset, normalisation, resolve_device
from ..engine.evaluate import predict
from ..errors import ConfigError
from ..models import load_model
from ..viz import Sample, figure1, figure2, fixed, percent, report_page, shrink_png, sweep_plot
from .common import App, check_out_folder
from .compare import LABELS
from .predict import stage_names


@dataclass
class Variant:
    """One evaluated variant of a run."""

    name: str
    method: str  # dense, dtop, or a token-reduction alternative
    p0: Optional[float]
    miou: float
    gflops: float
    folder: Path  # holds metrics.json and per_image.csv

    @cached_property
    def metrics(self) -> dict[str, Any]:
        return json.loads((self.folder / "metrics.json").read_text())

    def per_image(self) -> list[dict[str, str]]:
        with open(self.folder / "per_image.csv", newline="") as f:
            return list(csv.DictReader(f))

    @property
    def label(self) -> str:
        return LABELS.get(self.method, self.method) + (f" (p0 {self.p0:g})" if self.p0 is not None else "")

    @property
    def short(self) -> str:
        """``p0 0.9`` (or the variant's name when it has no p0, e.g. a budget variant)."""
        return f"p0 {self.p0:g}" if self.p0 is not None else self.name

    @property
    def has_exits(self) -> bool:
        """Whether any token left before the final stage (a share of the tokens, over the evaluation)."""
        return sum(self.metrics.get("exit_fractions", [])[:-1]) > 0


def load_run(run_dir: Path) -> tuple[list[Variant], bool]:
    """The variants of an eval or compare output folder, dense first; and whether it is a comparison."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such folder (give a `dtop eval --out` or `dtop compare --out` folder)")
    if (run_dir / "compare.json").is_file():
        rows = json.loads((run_dir / "compare.json").read_text())["rows"]
        base, compare = run_dir / "eval", True
    elif (run_dir / "summary.json").is_file():
        rows = json.loads((run_dir / "summary.json").read_text())
        base, compare = run_dir, False
    else:
        raise ConfigError(f"{run_dir} holds no evaluation: expected summary.json (dtop eval) or compare.json "
                          f"(dtop compare)")
    variants = []
    for r in rows:
        folder = base / r["name"]
        if not (folder / "metrics.json").is_file():
            raise ConfigError(f"{folder / 'metrics.json'} is missing: the run folder is incomplete")
        if r.get("miou") is None:
            raise ConfigError(f"{folder}: mIoU is undefined (the evaluation saw no labelled pixel), so there is "
                              f"nothing to report; check the labels (label_mode, reduce_zero_label, data.ignore_index)")
        v = Variant(r["name"], r.get("method", ""), r.get("p0"), float(r["miou"]), float(r["gflops"]), folder)
        v.method = v.method or v.metrics.get("variant", "dtop")
        variants.append(v)
    variants.sort(key=lambda v: v.method != "dense")
    return variants, compare


def _nearest_first(variants: list[Variant], target: float = 0.9) -> list[Variant]:
    """The DToP variants, those with a p0 nearest ``target`` first, then those without a p0 (budget)."""
    dtop = [v for v in variants if v.method == "dtop"]
    return sorted(dtop, key=lambda v: (v.p0 is None, 0.0 if v.p0 is None else abs(v.p0 - target)))


def pick_dtop(variants: list[Variant], p0: Optional[float]) -> Optional[Variant]:
    """The DToP variant at ``p0``; by default the one nearest the paper's 0.9 in which tokens leave before
    the final stage (:attr:`Variant.has_exits`), or, when none has, the one nearest 0.9 (see
    :func:`exit_alerts`). ConfigError when ``p0`` is given and the run has no variant at it."""
    ranked = _nearest_first(variants)
    if not ranked:
        return None
    if p0 is None:
        return next((v for v in ranked if v.has_exits), ranked[0])
    exact = [v for v in ranked if v.p0 is not None and abs(v.p0 - p0) <= 1e-9]
    if not exact:
        raise ConfigError(f"no DToP variant at p0 {p0:g}; the run has {', '.join(v.short for v in ranked)}")
    return exact[0]


def exit_alerts(variants: list[Variant], chosen: Optional[Variant], p0: Optional[float]) -> list[str]:
    """What the report must say about early exits: that the variant nearest 0.9 was passed over for having
    none, that the chosen one has none (and which have), or that no DToP variant of the run has any."""
    ranked = _nearest_first(variants)
    if chosen is None:
        return []
    if chosen.has_exits:
        skipped = [v for v in ranked[: ranked.index(chosen)] if p0 is None]
        return [f"In DToP {', '.join(v.short for v in skipped)} no token left before the final stage; the figures "
                f"show DToP {chosen.short}, the variant nearest p0 0.9 with early exits."] if skipped else []
    others = [v.short for v in ranked if v.has_exits]
    if others:
        return [f"In DToP {chosen.short} no token left before the final stage (every token ran every block); "
                f"tokens do leave early in {', '.join(others)} (dtop report --p0 to picture one)."]
    return ["No DToP variant of this run has a token that left before the final stage: every token ran every "
            "block, so the figures show no pruning. The exit heads never reached p0 (an under-trained model, or "
            "p0 too strict): train longer or evaluate lower p0."]


def provenance(variants: list[Variant]) -> list[tuple[str, str]]:
    """The report's origin as (name, value) rows: checkpoint(s), dataset (name, split, root), number of
    images, dtop version (the report's, and the evaluation's where it differs)."""
    ckpts: dict[str, list[str]] = {}
    for v in variants:
        found = recorded_checkpoint(v)  # absolute: the path as typed at eval time may be relative to another folder
        ckpts.setdefault(str(found.resolve()) if found else str(v.metrics.get("checkpoint") or "unknown"),
                         []).append(v.name)
    rows = [("checkpoint", "; ".join(c if len(ckpts) == 1 else f"{c} ({', '.join(n)})" for c, n in ckpts.items()))]
    data = (variants[0].metrics.get("config") or {}).get("data") or {} if variants else {}
    root = f" at {data['root']}" if data.get("root") else ""
    rows.append(("dataset", f"{data.get('name') or 'unknown'}, split {data.get('val_split', '?')}{root}"))
    images = sorted({int(v.metrics["num_images"]) for v in variants if v.metrics.get("num_images") is not None})
    rows.append(("images", ", ".join(str(n) for n in images) or "unknown"))
    evaluated = sorted({str(v.metrics["run"]["dtop"]) for v in variants if (v.metrics.get("run") or {}).get("dtop")})
    differs = evaluated and evaluated != [__version__]
    rows.append(("dtop version", __version__ + (f" (evaluated with {', '.join(evaluated)})" if differs else "")))
    return rows


def spread(values: list[float], n: int) -> list[int]:
    """Indices of ``n`` entries evenly spread over the sorted ``values`` (lowest and highest included)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    if n >= len(order):
        return order
    return [order[round(j * (len(order) - 1) / max(1, n - 1))] for j in range(n)]


def recorded_checkpoint(v: Variant) -> Optional[Path]:
    """The checkpoint a variant's metrics.json names, as given to the evaluation (absolute, or relative to
    the folder it ran in) or, failing that, relative to the metrics file (``checkpoint_relative``), so a
    report works from any folder; None when neither exists."""
    m = v.metrics
    for candidate in (m.get("checkpoint"), m.get("checkpoint_relative") and v.folder / m["checkpoint_relative"]):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def figure1_samples(dense: Variant, dtop: Variant, n: int, device: str = "auto") -> tuple[list[Sample], Any]:
    """Rerun the dense and DToP checkpoints on ``n`` validation images chosen across the range of
    per-image GFLOPs savings. Returns the samples and the model (for its stages)."""
    dm, tm = dense.metrics, dtop.metrics
    paths = {}
    for v, m in ((dense, dm), (dtop, tm)):
        paths[v.name] = recorded_checkpoint(v)
        if paths[v.name] is None:
            raise ConfigError(f"{v.name}: checkpoint {m.get('checkpoint')!r} not found, neither from here nor from "
                              f"{v.folder} (Figure 1 reruns it)")
    cfg = config_from_dict(tm["config"])
    rows_d, rows_t = dense.per_image(), dtop.per_image()
    savings = [1 - float(t["gflops"]) / float(d["gflops"]) for d, t in zip(rows_d, rows_t)]
    chosen = spread(savings, n)
    dev = resolve_device(device)
    dataset = experiment_dataset(cfg, cfg.data.val_split, train=False)
    dense_model = load_model(paths[dense.name], dev).eval()
    same = paths[dtop.name].resolve() == paths[dense.name].resolve()
    dtop_model = dense_model if same else load_model(paths[dtop.name], dev).eval()
    if tm.get("exit_mode") == "budget":  # the dense path ignores the exit rule, so one model can serve both
        dtop_model.set_budget(tm["exit_ratio"], tm.get("p_min") or 0.0)
    else:
        dtop_model.set_p0(dtop.p0)
    samples = []
    for i in sorted(chosen, key=lambda i: savings[i]):
        item = dataset[i]
        if item["name"] != rows_t[i]["file"]:
            raise ConfigError(f"validation image {i} is {item['name']}, the evaluation had {rows_t[i]['file']}: "
                              f"the dataset changed since")
        label = item["label"].numpy()
        size = label.shape
        pd = predict(dense_model, item["image"].to(dev), cfg.eval, dense=True)
        pt = predict(dtop_model, item["image"].to(dev), cfg.eval)
        image = np.asarray(Image.fromarray(denormalize(item["image"], *normalisation(cfg)))
                           .resize((size[1], size[0]), Image.BILINEAR))
        samples.append(Sample(
            name=Path(item["name"]).name, image=image, label=label,
            dense=pd.label_map(size).numpy(), dtop=pt.label_map(size).numpy(),
            exit_stage=pt.exit_stages(size).numpy(),
            reduction_pct=100 * savings[i], acc_dense=100 * float(rows_d[i]["pixel_acc"]),
            acc_dtop=100 * float(rows_t[i]["pixel_acc"])))
    return samples, dtop_model


def comparison_figures(dense: Variant, dtop: Variant, out_dir: Path, num_images: int,
                       device: str) -> tuple[list[tuple[str, Path, str]], list[str]]:
    """Figures 1 and 2 (dense against DToP) and the notes on what had to be left out."""
    figures, notes = [], []
    try:
        samples, model = figure1_samples(dense, dtop, num_images, device)
        data = dtop.metrics["config"]["data"]  # the dataset's own colours (a folder dataset's palette too)
        palette, names = trained_display_meta(data, model.num_classes)
        figures.append(("Figure 1: where tokens exit, per image", figure1(
            samples, palette, stage_names(model), out_dir / "figure1.png", dtop_label=f"DToP {dtop.short}",
            ignore_index=data.get("ignore_index", 255), classes=names),
            "Images across the range of per-image GFLOPs savings (least saved at the top). Columns: image, "
            "ground truth, dense prediction, DToP prediction, and the stage at which each token left; the "
            "legends give the colours of the classes in these images and of the stages. "
            "Accuracy is category-agnostic pixel accuracy."))
    except ConfigError as e:
        notes.append(f"Figure 1 left out: {e}")
    dm, tm = dense.metrics, dtop.metrics
    classes = list(dm["per_class_iou"])
    figures.append(("Figure 2: per-category IoU", figure2(
        classes, [dm["per_class_iou"][c] for c in classes], [tm["per_class_iou"][c] for c in classes],
        out_dir / "figure2.png", labels=("dense", f"DToP {dtop.short}")),
        "\"absent\": the class is in neither the labels nor the predictions, so its IoU is undefined (no bar); "
        "\"0\": the class is there but was never predicted right (IoU 0)."))
    return figures, notes


def build_report(run_dir: Path, out_dir: Optional[Path] = None, p0: Optional[float] = None, num_images: int = 4,
                 device: str = "auto", max_width: Optional[int] = None) -> Path:
    """Write the figures and report.html; returns the path of report.html. ``max_width``: scale the
    figures down to at most this many pixels wide (small files, e.g. for a README gallery).
    ConfigError when ``run_dir`` holds no evaluation or no DToP variant at ``p0``."""
    run_dir = Path(run_dir)
    variants, compare = load_run(run_dir)  # before anything is written: a wrong folder is not created
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    dense = next((v for v in variants if v.method == "dense"), None)
    dtop = pick_dtop(variants, p0)
    alerts = exit_alerts(variants, dtop, p0)
    if dense is not None and dtop is not None:
        figures, notes = comparison_figures(dense, dtop, out_dir, num_images, device)
    else:
        figures, notes = [], [f"Figures 1 and 2 need a {'DToP' if dtop is None else 'dense'} variant; "
                              f"this run has none."]
    points = [{"method": v.method, "label": v.label if v.method != "dtop" else "DToP" if v.p0 is not None else v.name,
               "gflops": v.gflops, "miou": v.miou, "p0": v.p0} for v in variants]
    figures.append(("mIoU against GFLOPs", sweep_plot(points, out_dir / "sweep.png"),
                    "DToP at each evaluated p0" + (", with the other methods of the comparison" if compare else "")
                    + "; the star is the dense model."))
    if max_width is not None:
        for _, path, _ in figures:
            shrink_png(path, max_width)
    page = report_page(run_dir, _results_table(variants, dense), figures, _class_table(dense, dtop), notes, compare,
                       provenance=provenance(variants), alerts=alerts)
    path = out_dir / "report.html"
    path.write_text(page)
    for text in [*alerts, *notes]:  # what the page warns about, on the terminal too
        if text.startswith(("Figures 1 and 2 need", "No DToP variant")) or text in alerts:
            print(f"dtop report: warning: {text}", file=sys.stderr)
    return path


def _results_table(variants: list[Variant], dense: Optional[Variant]) -> tuple[list[str], list[list[str]]]:
    base = dense.gflops if dense is not None else None
    rows = []
    for v in variants:
        m = v.metrics
        saved = "" if base is None else percent(100 * (1 - v.gflops / base))
        exits = " / ".join(percent(100 * f) for f in m.get("exit_fractions", [])) if v.method == "dtop" else ""
        macc = "n/a" if m.get("macc") is None else fixed(m["macc"], 2)
        rows.append([v.label, fixed(v.miou, 2), macc, fixed(v.gflops, 3), saved, exits])
    return ["variant", "mIoU", "mAcc", "GFLOPs / image", "GFLOPs saved", "tokens leaving at each stage"], rows


def _class_table(dense: Optional[Variant], dtop: Optional[Variant]) -> Optional[tuple[list[str], list[list[str]]]]:
    if dense is None or dtop is None:
        return None
    d, t = dense.metrics["per_class_iou"], dtop.metrics["per_class_iou"]
    rows = [[c, _f(d[c]), _f(t[c]), _f(None if d[c] is None or t[c] is None else t[c] - d[c], signed=True)]
            for c in d]
    return ["class", "dense", dtop.label, "difference"], rows


def _f(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return fixed(v, 2, signed)


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("run_dir")
    sp.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    sp.add_argument("--p0", type=float, default=None, help="the DToP variant to picture (default: nearest 0.9)")
    sp.add_argument("--images", type=int, default=4, help="rows of Figure 1")
    sp.add_argument("--max-width", type=int, default=None, metavar="PX",
                    help="scale the figures down to this width with a 256-colour palette (small files)")
    sp.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> None:
    if args.images < 1:
        raise ConfigError(f"--images is the number of rows of Figure 1, at least 1; got {args.images}")
    check_out_folder(args.out)
    path = build_report(Path(args.run_dir), Path(args.out) if args.out else None, p0=args.p0,
                        num_images=args.images, device=args.device, max_width=args.max_width)
    print(f"report: {path}")


APP = App("report", "figures and report.html from a dtop eval or dtop compare output folder", add_arguments, run)
