"""The model config: one dataclass, dumped beside every checkpoint and result."""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import yaml

from ..config import EXIT_MODES
from ..errors import ConfigError, did_you_mean, unknown_name
from .heads import HEADS


@dataclass
class StageSpec:
    """A stage head after 0-based block ``block`` of type ``head`` (``atm``, ``mask`` or ``linear``)."""

    block: int
    head: str = "atm"
    head_kwargs: dict[str, Any] = field(default_factory=dict)


REDUCTIONS = ("conv", "avgpool", "nearest", "shrunk", "expedite")


@dataclass
class ReductionSpec:
    """A token-reduction alternative to DToP (``docs/method/alternatives.md``), for the supplement's comparisons.

    kind: ``conv`` (2x2 stride-2 convolution), ``avgpool`` (2x2 average pooling), ``nearest`` (2x2 nearest
    sampling): after 0-based block ``block`` the tokens are downsampled 2x per side and the heads'
    outputs are upsampled back; ``shrunk`` (SegViT shrunk): block ``block`` runs with stride-2 subsampled
    tokens as queries over all tokens; ``expedite`` (Expedite-ViT, training-free): after block ``block``
    tokens are clustered into a grid ``cluster_scale`` times the token grid per side (``iters`` iterations,
    affinity ``softmax(-d * tau)`` over the centroids within a ``window`` x ``window`` neighbourhood), and
    the heads' outputs are reconstructed at every token from the ``topk`` nearest centroids.
    ``block`` None: the supplement's place for a 12-block ViT-B, scaled to the backbone's depth
    (after layer 9 for the symmetric operators, layer 8 for shrunk, see :func:`default_block`).
    """

    kind: str
    block: Optional[int] = None
    cluster_scale: float = 0.75
    iters: int = 5
    tau: float = 0.02
    window: int = 5
    topk: int = 20

    def __post_init__(self) -> None:
        if self.kind not in REDUCTIONS:  # the one place the kind is checked
            raise unknown_name("reduction", self.kind, REDUCTIONS)

    def validate(self, depth: int) -> None:
        """ConfigError for settings that do not fit a backbone of ``depth`` blocks or are out of range."""
        b = self.resolved_block(depth)
        if not 0 <= b < depth:
            raise ConfigError(f"reduction {self.kind} at block {b}, but the backbone has blocks 0..{depth - 1}")
        if not 0 < self.cluster_scale <= 1:
            raise ConfigError(f"reduction cluster_scale must be in (0, 1], got {self.cluster_scale}")
        if self.iters < 0 or self.window < 1 or self.window % 2 == 0 or self.topk < 1 or self.tau <= 0:
            raise ConfigError("reduction needs iters >= 0, an odd window >= 1, topk >= 1 and tau > 0")

    def resolved_block(self, depth: int) -> int:
        return self.block if self.block is not None else default_block(self.kind, depth)


def default_block(kind: str, depth: int) -> int:
    """The supplement's places on ViT-B (12 blocks), scaled to ``depth``: downsampling at the end of
    layer 9 (0-based block 8), SegViT shrunk's query downsampling in layer 8 (block 7), Expedite's
    clustering after layer 6 (block 5)."""
    layer = {"shrunk": 8, "expedite": 6}.get(kind, 9)
    return max(0, round(layer * depth / 12) - 1)


@dataclass
class SegmentorConfig:
    """Everything needed to build a segmentor (:func:`dtop.models.build_model`): a
    :class:`~dtop.models.segmentor.DToPSegmentor`, or with ``reduction`` a
    :class:`~dtop.models.reduction.ReducedSegmentor`.

    exit_mode: ``"threshold"`` (the paper's rule: tokens with confidence > p0 exit) or ``"budget"``
    (every image exits exactly ``round(exit_ratio * N)`` of its N tokens at each non-final stage, its most
    confident ones; fixed shapes for deployment, ``docs/method/exit-rule.md``).
    p0: exit threshold, one float for all non-final stages or a list with one per non-final
    stage; ``p0 >= 1`` disables pruning. exit_ratio: budget mode's fraction of the N tokens that exit
    at each non-final stage (one float for all, or one per stage; their sum below 1); p_min: budget
    mode's confidence floor (only tokens above it may exit; the count becomes an upper bound).
    topk: context tokens kept per predicted class.
    cls_mode: ``"segvit"`` (prefix tokens dropped before the blocks) or ``"segmenter"``
    (kept through the blocks, dropped before decoding). final_norm: apply the ViT's final
    LayerNorm to the tokens of the last stage head.
    """

    backbone: str = "vit_base_patch16_384"
    num_classes: int = 150
    stages: list[StageSpec] = field(default_factory=lambda: [StageSpec(5), StageSpec(7), StageSpec(11)])
    p0: Union[float, list[float]] = 0.9
    exit_mode: str = "threshold"
    exit_ratio: Union[float, list[float]] = 0.0
    p_min: float = 0.0
    topk: int = 5
    cls_mode: str = "segvit"
    final_norm: bool = False
    img_size: Optional[int] = None
    pretrained: Union[bool, str] = False
    drop_path_rate: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    reduction: Optional[ReductionSpec] = None
    name: str = ""

    def p0_per_stage(self) -> list[float]:
        """One threshold per non-final stage; ConfigError for a wrong count or a value outside (0, 1]."""
        n = len(self.stages) - 1
        values = [self.p0] * n if isinstance(self.p0, (int, float)) and not isinstance(self.p0, bool) else self.p0
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"p0 must be a number in (0, 1] or a list of them, got {self.p0!r}")
        p0 = [check_p0(p) for p in values]
        if len(p0) != n:
            raise ConfigError(f"p0 has {len(p0)} values but the model has {n} non-final stages")
        return p0

    def exit_ratio_per_stage(self) -> list[float]:
        """Budget mode's exit fraction per non-final stage; ConfigError when a value is outside [0, 1), the
        count is wrong or the fractions sum to 1 or more (the final stage needs tokens)."""
        n = len(self.stages) - 1
        r = self.exit_ratio
        ratios = [r] * n if isinstance(r, (int, float)) and not isinstance(r, bool) else list(r)
        if len(ratios) != n:
            raise ConfigError(f"exit_ratio has {len(ratios)} values but the model has {n} non-final stages")
        for v in ratios:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"exit_ratio values are fractions of the tokens in [0, 1), got {v!r}")
        if sum(ratios) >= 1:
            raise ConfigError(f"exit_ratio {ratios} sums to {sum(ratios):g}: the stages together must leave some "
                              f"tokens for the final head (sum below 1)")
        return [float(v) for v in ratios]

    def validate(self) -> None:
        """ConfigError naming the first inconsistent setting."""
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, numbers.Integral) or self.num_classes < 1:
            raise ConfigError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if not isinstance(self.topk, numbers.Integral) or isinstance(self.topk, bool):
            raise ConfigError(f"topk must be an integer, got {self.topk!r}")
        if not self.stages:
            raise ConfigError("a model needs at least one stage head")
        blocks = [s.block for s in self.stages]
        if blocks != sorted(set(blocks)):
            raise ConfigError(f"stage blocks must be strictly increasing, got {blocks}")
        for s in self.stages:
            if s.head not in HEADS:
                raise unknown_name("head type", s.head, sorted(HEADS))
        if self.topk < 0:
            raise ConfigError(f"topk must be >= 0, got {self.topk}")
        self.p0_per_stage()
        if self.exit_mode not in EXIT_MODES:
            raise unknown_name("exit_mode", self.exit_mode, EXIT_MODES)
        self.exit_ratio_per_stage()
        if isinstance(self.p_min, bool) or not isinstance(self.p_min, (int, float)) or not 0 <= self.p_min < 1:
            raise ConfigError(f"p_min (budget mode's confidence floor) must be in [0, 1), got {self.p_min!r}")
        if self.exit_mode == "budget" and self.reduction is not None:
            raise ConfigError("exit_mode budget is DToP's; a token-reduction alternative has no exits")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmentorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}{did_you_mean(unknown[0], known)}; "
                              f"known keys: {', '.join(sorted(known))}")
        d = dict(d)
        if "stages" in d:
            d["stages"] = [s if isinstance(s, StageSpec) else StageSpec(**s) for s in d["stages"]]
        if isinstance(d.get("reduction"), dict):
            d["reduction"] = reduction_from_dict(d["reduction"])
        elif isinstance(d.get("reduction"), str):  # "avgpool", "expedite,block=5": as --reduction reads it
            d["reduction"] = parse_reduction(d["reduction"])
        return cls(**d)


def check_p0(p: Any, what: str = "p0") -> float:
    """``p`` as a float when it is a confidence threshold in (0, 1] (1: no token exits), else ConfigError."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
        raise ConfigError(f"{what} is a confidence threshold in (0, 1] (1: no token exits early), got {p!r}")
    return float(p)


def reduction_from_dict(d: dict[str, Any]) -> ReductionSpec:
    known = {f.name for f in fields(ReductionSpec)}
    unknown = sorted(set(d) - known)
    if unknown or "kind" not in d:
        raise ConfigError(f"reduction: unknown keys {', '.join(unknown) or '(none)'}; it needs kind "
                          f"({', '.join(REDUCTIONS)}) and takes {', '.join(sorted(known))}")
    return ReductionSpec(**d)


def parse_reduction(text: Optional[str]) -> Optional[ReductionSpec]:
    """``KIND[,key=value...]`` (values read as YAML) -> a ReductionSpec, e.g. ``expedite,block=5,cluster_scale=0.75``;
    None for an empty text. ConfigError for a malformed text or unknown keys."""
    if not text:
        return None
    kind, *pairs = text.split(",")
    d: dict[str, Any] = {"kind": kind.strip()}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--reduction: expected key=value after the kind, got {pair!r}")
        key, value = pair.split("=", 1)
        d[key.strip()] = yaml.safe_load(value)
    return reduction_from_dict(d)
