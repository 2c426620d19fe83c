"""Pick the exit rule that meets a GFLOPs target (``dtop calibrate``), on a sample of training images.

Mean GFLOPs per image falls as p0 falls (threshold rule) and as the exit ratios grow (budget rule), so
each search is a bisection on one number:

- threshold: one p0 for every non-final stage, in [0, 1];
- budget: the exit ratios ``t * profile``, ``profile`` the share of the exits at each non-final stage.
  By default the profile is the threshold rule's own at the same target (the p0 found first): the
  budget then spends the GFLOPs where the paper's rule spends them, at a fixed count per image.

The images are read as evaluation reads them (no augmentation), evenly spaced over the split.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import tqdm

from ..config import EvalSection, ExperimentConfig
from ..errors import ConfigError
from ..models import DToPSegmentor
from .evaluate import predict


@dataclass
class Calibration:
    """The rule found: ``exit_mode``, ``p0`` (threshold) or ``exit_ratio`` (budget), the mean GFLOPs per image it
    gives on the sample (``achieved``) against ``target`` and the dense model's (``dense``); ``trace``: every
    setting tried, (value, GFLOPs)."""

    exit_mode: str
    target: float
    dense: float
    achieved: float
    p0: Optional[float] = None
    exit_ratio: Optional[list[float]] = None
    exit_fractions: list[float] = field(default_factory=list)
    trace: list[tuple[float, float]] = field(default_factory=list)
    images: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def sample_images(dataset, n: int) -> list[torch.Tensor]:
    """``n`` images evenly spaced over ``dataset`` (all of them when it holds fewer)."""
    total = len(dataset)
    if total == 0:
        raise ConfigError("the calibration split holds no image")
    idx = sorted({int(i * total / min(n, total)) for i in range(min(n, total))})
    return [dataset[i]["image"] for i in idx]


def mean_gflops(model: DToPSegmentor, images: Sequence[torch.Tensor], ecfg: EvalSection, device: torch.device,
                dense: bool = False) -> tuple[float, list[float]]:
    """Mean GFLOPs per image and mean exit fraction per stage of ``model`` (as evaluation counts them)."""
    total, exits = 0.0, torch.zeros(model.num_stages)
    with torch.no_grad():
        for img in images:
            pred = predict(model, img.to(device), ecfg, dense=dense)
            total += pred.gflops
            exits += pred.exit_fractions
    return total / len(images), [round(float(e) / len(images), 5) for e in exits]


def bisect(measure: Callable[[float], float], lo: float, hi: float, target: float, steps: int,
           trace: list[tuple[float, float]]) -> float:
    """The value in [lo, hi] whose ``measure`` is nearest ``target``, for a ``measure`` that falls as the value
    grows (``steps`` halvings); every evaluation is appended to ``trace``."""
    cache: dict[float, float] = {}

    def f(v: float) -> float:
        if v not in cache:
            cache[v] = measure(v)
            trace.append((round(v, 6), round(cache[v], 4)))
        return cache[v]

    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda v: abs(f(v) - target))


def calibrate(model: DToPSegmentor, images: Sequence[torch.Tensor], ecfg: EvalSection, device: torch.device,
              target: Optional[float] = None, exit_mode: str = "threshold", profile: Optional[Sequence[float]] = None,
              steps: int = 12, progress: bool = False, reduction: Optional[float] = None) -> Calibration:
    """The exit rule of ``exit_mode`` whose mean GFLOPs on ``images`` is nearest ``target`` (GFLOPs per image),
    or, with ``reduction`` instead, nearest ``(1 - reduction)`` times the dense model's GFLOPs on them.
    ``profile``: budget mode's share of exits per non-final stage (default: the threshold rule's at the
    target). ConfigError when the target is above the dense model's GFLOPs or not positive; a target below
    what the rule can reach gives the nearest reachable setting (``achieved`` says how near)."""
    if not isinstance(model, DToPSegmentor):
        raise ConfigError("calibration picks DToP's exit rule; this checkpoint is a token-reduction alternative")
    dense, _ = mean_gflops(model, images, ecfg, device, dense=True)
    if (target is None) == (reduction is None):
        raise ConfigError("calibrate needs a GFLOPs target or a reduction, one of them")
    target = dense * (1 - reduction) if target is None else target
    if not 0 < target < dense:
        raise ConfigError(f"the GFLOPs target {target:.4g} must lie between 0 and the dense model's {dense:.4g} "
                          f"GFLOPs per image on these images")
    bar = tqdm(total=steps * (2 if exit_mode == "budget" and profile is None else 1), desc="calibrate",
               disable=not progress)
    trace: list[tuple[float, float]] = []

    def at_p0(p: float) -> float:
        model.set_p0(p)
        bar.update()
        return mean_gflops(model, images, ecfg, device)[0]

    if exit_mode == "threshold" or profile is None:
        # falls as p0 falls: bisect on 1 - p0
        q = bisect(lambda v: at_p0(1 - v), 0.0, 1.0, target, steps, trace)
        p0 = round(1 - q, 6)
        model.set_p0(p0)
        achieved, fractions = mean_gflops(model, images, ecfg, device)
        if exit_mode == "threshold":
            bar.close()
            return Calibration("threshold", target, dense, achieved, p0=p0, exit_fractions=fractions,
                               trace=[(round(1 - v, 6), g) for v, g in trace], images=len(images))
        profile = fractions[:-1]
    S = model.num_stages - 1
    profile = [float(v) for v in profile]
    if len(profile) != S or any(v < 0 for v in profile) or not sum(profile) > 0:
        raise ConfigError(f"the budget profile needs {S} non-negative shares with a positive sum, got {profile}")
    share = [v / sum(profile) for v in profile]
    top = 0.999  # the ratios must sum below 1

    def at_scale(t: float) -> float:
        model.set_budget([t * s for s in share])
        bar.update()
        return mean_gflops(model, images, ecfg, device)[0]

    trace_budget: list[tuple[float, float]] = []
    t = bisect(at_scale, 0.0, top, target, steps, trace_budget)
    ratios = [round(t * s, 6) for s in share]
    if math.fsum(ratios) >= 1:
        ratios = [r * 0.999 / math.fsum(ratios) for r in ratios]
    model.set_budget(ratios)
    achieved, fractions = mean_gflops(model, images, ecfg, device)
    bar.close()
    return Calibration("budget", target, dense, achieved, exit_ratio=ratios, exit_fractions=fractions,
                       trace=trace_budget, images=len(images))


def calibrated_config(cfg: ExperimentConfig, result: Calibration) -> ExperimentConfig:
    """``cfg`` whose eval section runs the calibrated rule and reports the target beside the achieved GFLOPs."""
    out = copy.deepcopy(cfg)
    out.eval.exit_mode = result.exit_mode
    out.eval.target_gflops = round(result.target, 4)
    if result.exit_mode == "threshold":
        out.eval.p0 = [result.p0]
    else:
        out.eval.exit_ratio = list(result.exit_ratio)
        out.eval.p_min = 0.0
    return out
