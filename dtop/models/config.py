"""The model config: one dataclass, dumped beside every checkpoint and result."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from ..errors import ConfigError


@dataclass
class StageSpec:
    """A stage head after 0-based block ``block`` of type ``head`` (``atm``, ``mask`` or ``linear``)."""

    block: int
    head: str = "atm"
    head_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SegmentorConfig:
    """Everything needed to build a :class:`~dtop.models.segmentor.DToPSegmentor`.

    p0: exit threshold, one float for all non-final stages or a list with one per non-final
    stage; ``p0 >= 1`` disables pruning. topk: context tokens kept per predicted class.
    cls_mode: ``"segvit"`` (prefix tokens dropped before the blocks) or ``"segmenter"``
    (kept through the blocks, dropped before decoding). final_norm: apply the ViT's final
    LayerNorm to the tokens of the last stage head.
    """

    backbone: str = "vit_base_patch16_384"
    num_classes: int = 150
    stages: list[StageSpec] = field(default_factory=lambda: [StageSpec(5), StageSpec(7), StageSpec(11)])
    p0: Union[float, list[float]] = 0.9
    topk: int = 5
    cls_mode: str = "segvit"
    final_norm: bool = False
    img_size: Optional[int] = None
    pretrained: Union[bool, str] = False
    drop_path_rate: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def p0_per_stage(self) -> list[float]:
        """One threshold per non-final stage."""
        n = len(self.stages) - 1
        if isinstance(self.p0, (int, float)):
            return [float(self.p0)] * n
        p0 = [float(p) for p in self.p0]
        if len(p0) != n:
            raise ConfigError(f"p0 has {len(p0)} values but the model has {n} non-final stages")
        return p0

    def validate(self) -> None:
        from .heads import HEADS

        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.stages:
            raise ConfigError("a model needs at least one stage head")
        blocks = [s.block for s in self.stages]
        if blocks != sorted(set(blocks)):
            raise ConfigError(f"stage blocks must be strictly increasing, got {blocks}")
        for s in self.stages:
            if s.head not in HEADS:
                raise ConfigError(f"unknown head type {s.head!r}; choose from {sorted(HEADS)}")
        if self.topk < 0:
            raise ConfigError(f"topk must be >= 0, got {self.topk}")
        self.p0_per_stage()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmentorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        d = dict(d)
        if "stages" in d:
            d["stages"] = [s if isinstance(s, StageSpec) else StageSpec(**s) for s in d["stages"]]
        return cls(**d)
