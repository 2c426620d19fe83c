"""Experiment configs: dataclasses read from YAML, overridden with ``--set key=value``, dumped beside
every checkpoint and result."""
from __future__ import annotations

import dataclasses
import os
import warnings
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError, did_you_mean, unknown_name


@dataclass
class ModelSection:
    """A preset (``dtop models``) and overrides of any ``SegmentorConfig`` field (stages, topk, ...)."""

    preset: str = "segvit_vit_t16"
    pretrained: Union[bool, str] = False
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Dataset (``dtop.data.DATASETS``), its options, and the train/eval pipelines. ``mean``/``std``
    (0..1 scale, RGB) default to the backbone's own normalisation from timm's pretrained config
    (ImageNet's for DINOv2, 0.5 for the AugReg ViTs); :func:`dtop.engine.common.normalisation` resolves them.
    ``ignore_index``: the label id that means "ignore" in the label mapping, the loss and the metrics (255;
    a dataset whose class ids reach it is refused: set it above the last class id, e.g. 65535)."""

    name: str = "synthetic"
    root: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    val_options: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    crop_size: list[int] = field(default_factory=lambda: [128, 192])
    scale: Optional[list[int]] = None
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    mean: Optional[list[float]] = None  # None: the backbone's own, from timm's pretrained config
    std: Optional[list[float]] = None
    eval_scale: Optional[list[int]] = None
    num_workers: int = 2
    ignore_index: int = 255  # the label id that means "ignore" (label files, loss, metrics); not a class id


EXIT_MODES = ("threshold", "budget")  # DToP's exit rules (docs/method/exit-rule.md)


@dataclass
class TrainSection:
    """scheme: ``dense`` (all heads, p0 = 1), ``finetune`` (load ``init_checkpoint``, a trained dense
    model, and train with pruning at ``p0``), ``scratch`` (pruning at ``p0`` from the start)."""

    scheme: str = "dense"
    init_checkpoint: Optional[str] = None
    p0: Union[float, list[float]] = 0.9
    exit_mode: str = "threshold"  # or "budget": exit_ratio (and p_min) instead of p0 (docs/method/exit-rule.md)
    exit_ratio: Union[float, list[float]] = 0.5
    p_min: float = 0.0
    iters: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0
    warmup_iters: int = 100
    poly_power: float = 0.9
    grad_clip: Optional[float] = None
    amp: bool = True
    amp_dtype: str = "bfloat16"
    seed: int = 0
    log_interval: int = 20
    ckpt_interval: int = 200
    device: str = "auto"


@dataclass
class EvalSection:
    """mode ``whole`` (pad to the patch size) or ``slide`` (window/stride, overlaps averaged).
    exit_mode ``threshold``: DToP at each ``p0``; ``budget``: DToP with ``exit_ratio`` (one value per
    non-final stage, or one for all) and ``p_min``. ``target_gflops``: what ``dtop calibrate`` aimed at,
    reported beside the achieved GFLOPs."""

    mode: str = "whole"
    window: list[int] = field(default_factory=lambda: [512, 512])
    stride: list[int] = field(default_factory=lambda: [341, 341])
    p0: list[float] = field(default_factory=lambda: [0.9])
    exit_mode: str = "threshold"
    exit_ratio: Union[float, list[float]] = 0.5
    p_min: float = 0.0
    target_gflops: Optional[float] = None
    max_images: Optional[int] = None

    def check_windows(self) -> None:
        """ConfigError unless window and stride are two positive integers (H, W) each and the stride does not
        exceed the window (a larger stride leaves pixels between windows that no window predicts)."""
        for name in ("window", "stride"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, int) and x > 0 for x in v):
                raise ConfigError(f"eval.{name} must be two positive integers [H, W], got {v!r}")
        if any(s > w for s, w in zip(self.stride, self.window)):
            fix = [max(1, (2 * w) // 3) for w in self.window]
            raise ConfigError(f"eval.stride {list(self.stride)} exceeds eval.window {list(self.window)}: pixels "
                              f"between windows would get no prediction; use a stride <= the window, e.g. "
                              f"eval.stride={fix} (two thirds of the window, as mmsegmentation's 512/341)")


@dataclass
class ExperimentConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    out_dir: str = "runs/experiment"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.train.scheme not in ("dense", "finetune", "scratch"):
            raise ConfigError(f"train.scheme must be dense, finetune or scratch, got {self.train.scheme!r}")
        if self.train.scheme == "finetune" and not self.train.init_checkpoint:
            raise ConfigError("train.scheme=finetune needs train.init_checkpoint (a trained dense checkpoint)")
        if self.eval.mode not in ("whole", "slide"):
            raise ConfigError(f"eval.mode must be whole or slide, got {self.eval.mode!r}")
        if self.eval.mode == "slide":
            self.eval.check_windows()
        for where in ("train", "eval"):
            mode = getattr(self, where).exit_mode
            if mode not in EXIT_MODES:
                raise unknown_name(f"{where}.exit_mode", mode, EXIT_MODES)
        for where, values in (("train.p0", self.train.p0), ("eval.p0", self.eval.p0)):
            for p in values if isinstance(values, (list, tuple)) else [values]:
                if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
                    raise ConfigError(f"{where} is a confidence threshold in (0, 1] (1: no token exits early), "
                                      f"got {p!r}")
        if self.train.warmup_iters > self.train.iters:
            warnings.warn(f"train.warmup_iters ({self.train.warmup_iters}) is larger than train.iters "
                          f"({self.train.iters}): the learning rate never reaches train.lr", UserWarning)
        for name in ("iters", "batch_size", "grad_accum"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")


def _build(cls: type, data: Any, path: str) -> Any:
    """Recursively build dataclass ``cls`` from a dict, rejecting unknown keys with their full path."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {path or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}"
                          f"{did_you_mean(unknown[0], names)}; "
                          f"known keys{' of ' + path if path else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        sub = f"{path}.{key}" if path else key
        kwargs[key] = _build(hint, value, sub) if dataclasses.is_dataclass(hint) else _coerce(hint, value, sub)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against the field's type: a number written ``5e-05`` (YAML reads it as a string:
    YAML 1.1 floats need a dot) becomes a float, an int where a float is expected a float; anything else of
    the wrong type is a ConfigError naming the key. Types this does not know (dicts, unions of containers)
    pass through."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of its types "
                          f"({', '.join(getattr(a, '__name__', str(a)) for a in args)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise ConfigError(f"{key} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and value != int(value)):
            raise ConfigError(f"{key} must be {'an integer' if hint is int else 'a number'}, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list and args:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


FREE_FORM = ("overrides", "options", "val_options")  # sections whose keys are the model's or dataset's own


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in the config dict; below a free-form section (``model.overrides``,
    ``data.options``) any key is taken and missing levels are made (``model.overrides.backbone_kwargs.x=1``)."""
    keys = dotted.split(".")
    node = d
    for i, k in enumerate(keys[:-1]):
        free = any(p in FREE_FORM for p in keys[:i])
        if free and node.get(k) is None:
            node[k] = {}
        if not isinstance(node.get(k), dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a config section"
                              f"{did_you_mean(k, [n for n, v in node.items() if isinstance(v, dict)])}")
        node = node[k]
    if keys[-1] not in node and not any(p in FREE_FORM for p in keys[:-1]):
        raise ConfigError(f"--set {dotted}: unknown config key {dotted!r}{did_you_mean(keys[-1], node)}")
    node[keys[-1]] = value


PATH_KEYS = (("data", "root"), ("train", "init_checkpoint"))
"""Config keys that hold paths: relative ones resolve against the config file's folder (a ``--set`` value:
against the current folder), and :func:`save_config` writes them relative to the file it writes."""


def _resolve_paths(d: dict[str, Any], base: Path) -> None:
    """Make the relative paths of :data:`PATH_KEYS` in config dict ``d`` absolute, relative to folder ``base``."""
    for section, key in PATH_KEYS:
        value = (d.get(section) or {}).get(key)
        if isinstance(value, str) and value.startswith("~"):
            d[section][key] = os.path.expanduser(value)
        elif isinstance(value, str) and value and not os.path.isabs(value):
            d[section][key] = os.path.normpath(os.path.join(os.path.abspath(base), value))


def load_config(path: Optional[Union[str, Path]] = None, sets: Optional[list[str]] = None) -> ExperimentConfig:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides (values parsed as YAML). Relative paths
    (:data:`PATH_KEYS`: ``data.root``, ``train.init_checkpoint``) resolve against the config file's folder,
    those given with ``--set`` against the current folder; absolute paths stay as they are."""
    d = ExperimentConfig().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        _build(ExperimentConfig, loaded, "")  # unknown keys are reported against the file's own text
        _resolve_paths(loaded, path.parent)
        _merge(d, loaded)
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set(d, key.strip(), yaml.safe_load(raw))
        section, _, name = key.strip().partition(".")
        if (section, name) in PATH_KEYS:
            one = {section: {name: d[section][name]}}
            _resolve_paths(one, Path.cwd())
            d[section][name] = one[section][name]
    cfg = _build(ExperimentConfig, d, "")
    cfg.validate()
    return cfg


def config_from_dict(d: dict[str, Any]) -> ExperimentConfig:
    """An ExperimentConfig from a dumped dict (the ``config`` entry of checkpoints and results)."""
    base = ExperimentConfig().to_dict()
    _merge(base, d)
    return _build(ExperimentConfig, base, "")


def _merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("overrides", "options", "val_options"):
            _merge(base[k], v)
        else:
            base[k] = v


def save_config(cfg: ExperimentConfig, path: Union[str, Path]) -> None:
    """``cfg`` as YAML at ``path``, atomically (a temporary file renamed into place)."""
    path = Path(path)
    d = cfg.to_dict()
    for section, key in PATH_KEYS:  # relative to the file written, so the file works from any folder
        value = d[section].get(key)
        if isinstance(value, str) and os.path.isabs(value):
            d[section][key] = os.path.relpath(value, os.path.abspath(path.parent))
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(yaml.safe_dump(d, sort_keys=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
