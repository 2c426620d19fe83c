"""Training: AdamW with a head lr multiplier, linear warm-up + poly decay, gradient accumulation,
mixed precision on CUDA, DDP under torchrun, atomic checkpoints and resume (weights, optimiser, schedule,
iteration and torch's RNG; the data order and augmentations after a resume are not those of an
uninterrupted run).

Schemes (``docs/method/training.md``): ``dense`` trains every stage head with p0 = 1; ``finetune``
("@Finetune") starts from a trained dense checkpoint and trains with pruning on; ``scratch``
("@Scratch") trains with pruning on from the start. Exit decisions are taken under no_grad.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from ..checkpoint import (check_and_load, load_checkpoint, position_grids, read_file, recorded_grids,
                          save_atomic)
from ..config import ExperimentConfig, save_config
from ..convert import load_into
from ..errors import INTERRUPT_SIGNALS, CheckpointError, ConfigError, Interrupted, deferred_interrupts, raise_interrupted
from ..jsonio import dumps
from ..models import DToPSegmentor
from .common import (DistInfo, experiment_dataset, experiment_model, init_distributed, normalisation, progress_enabled,
                     resolve_device)
from .losses import segmentation_loss

LAST = "last.pt"
LOG = "train_log.jsonl"


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """Backbone at ``lr``, heads at ``lr * head_lr_mult``; no weight decay on norms, biases and the
    parameters the model names in ``no_weight_decay()`` (position embeddings, prefix tokens, class
    queries and embeddings)."""
    skip = model.no_weight_decay()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((name.startswith("heads."), p.ndim <= 1 or name in skip), []).append(p)
    return [{"params": ps, "lr": lr * (head_lr_mult if head else 1.0), "weight_decay": 0.0 if nd else weight_decay}
            for (head, nd), ps in groups.items()]


def lr_factor(it: int, total: int, warmup: int, power: float, warmup_ratio: float = 1e-6) -> float:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup`` iterations, then poly decay to 0."""
    if it < warmup:
        return warmup_ratio + (1 - warmup_ratio) * it / warmup
    return (1 - (it - warmup) / max(1, total - warmup)) ** power if total > warmup else 1.0


def _batches(loader: DataLoader, sampler, epoch: int) -> Iterator[dict[str, Any]]:
    while True:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
        epoch += 1


@dataclass
class _Run:
    """What one training run holds: the model and its DDP wrapper, optimiser, schedule and loss scaler."""

    cfg: ExperimentConfig
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype
    saved: int = -1  # the iteration of the last checkpoint this run wrote or resumed from
    dataset_record: Optional[dict[str, Any]] = None  # classes, palette, ignore id of the ids trained on

    @classmethod
    def build(cls, cfg: ExperimentConfig, model: nn.Module, device: torch.device, dist_info: DistInfo,
              state: Optional[dict[str, Any]]) -> "_Run":
        """AdamW, warm-up + poly schedule and scaler for ``model`` (restored from ``state`` when resuming)."""
        tc = cfg.train
        optimizer = torch.optim.AdamW(param_groups(model, tc.lr, tc.weight_decay, tc.head_lr_mult), lr=tc.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: lr_factor(it, tc.iters, tc.warmup_iters, tc.poly_power))
        use_amp = tc.amp and device.type == "cuda"
        amp_dtype = getattr(torch, tc.amp_dtype)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
        ddp_model = model
        if dist_info.world_size > 1:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        return cls(cfg, model, ddp_model, optimizer, scheduler, scaler, device, use_amp, amp_dtype)

    def step(self, batches: Iterator[dict[str, Any]], it: int) -> tuple[float, dict[str, float]]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the loss and its parts.
        FloatingPointError when the loss is not finite."""
        tc = self.cfg.train
        parts: dict[str, float] = {}
        total = 0.0
        ddp = isinstance(self.ddp_model, nn.parallel.DistributedDataParallel)
        for micro in range(tc.grad_accum):
            batch = next(batches)
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            sync = micro == tc.grad_accum - 1 or not ddp
            with self.ddp_model.no_sync() if not sync else contextlib.nullcontext():
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    out = self.ddp_model(images)
                loss, parts = segmentation_loss(out, labels, self.cfg.data.ignore_index)
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"loss is {float(loss.detach())} at iteration {it}: {parts}")
                self.scaler.scale(loss / tc.grad_accum).backward()
            total += float(loss.detach()) / tc.grad_accum
        with deferred_interrupts():  # the update and its schedule step go together or not at all
            if tc.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return total, parts

    def save(self, path: Path, done: int) -> None:
        """The atomic checkpoint after ``done`` iterations: weights, configs, optimiser, schedule, RNG."""
        save_atomic({"model": self.model.state_dict(), "model_config": self.model.cfg.to_dict(),
                     "pos_grid": position_grids(self.model),
                     "config": self.cfg.to_dict(), "dataset": self.dataset_record,  # what predict colours with
                     "iter": done, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "rng": torch.get_rng_state()}, path)
        self.saved = done

    def completed(self) -> int:
        """Iterations completed (resumed ones included): the schedule's step count, which advances with the
        optimiser's update in one uninterruptible block."""
        return int(self.scheduler.last_epoch)


def _quiet_worker(worker_id: int) -> None:
    """A data worker ends quietly on SIGINT or SIGTERM (by a KeyboardInterrupt, torch's cue to end a worker):
    after a Ctrl-C or ``kill`` of the whole process group the main process reports the interruption, not a
    worker "killed by signal" (torch's own SIGTERM handler lets a signal from elsewhere than the parent kill it)."""
    for s in INTERRUPT_SIGNALS:
        signal.signal(s, raise_interrupted)


def _loader(dataset, cfg: ExperimentConfig, dist_info: DistInfo, device: torch.device, start_iter: int):
    """Endless training batches: a random (or distributed) sampler, ``batch_size`` per process."""
    tc = cfg.train
    sampler = DistributedSampler(dataset, seed=tc.seed) if dist_info.world_size > 1 else RandomSampler(dataset)
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        drop_last=len(dataset) >= tc.batch_size * dist_info.world_size,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
                        worker_init_fn=_quiet_worker)
    return _batches(loader, sampler, epoch=start_iter)


def _warn_changed_schedule(cfg: ExperimentConfig, state: dict) -> None:
    """A warning naming the train settings a resumed run changes (other than its length and logging)."""
    before = (state.get("config") or {}).get("train") or {}
    now = cfg.to_dict()["train"]
    free = {"iters", "log_interval", "ckpt_interval", "device"}
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and k not in free and before[k] != now[k]]
    if changed:
        warnings.warn(f"--resume with changed train settings ({'; '.join(changed)}): the run goes on with the new "
                      f"ones from its checkpoint's iteration", UserWarning, stacklevel=3)


def _start(model: nn.Module, cfg: ExperimentConfig, ckpt_path: Path, resume: bool,
           dist_info: DistInfo) -> tuple[int, Optional[dict[str, Any]]]:
    """Weights to start from: ``ckpt_path`` when resuming (returns its iteration and state), else
    ``train.init_checkpoint`` if set. CheckpointError when resuming without a checkpoint."""
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        _warn_changed_schedule(cfg, state)
        check_and_load(model, state["model"], source=str(ckpt_path), grids=recorded_grids(state))
        return int(state["iter"]), state
    if resume:
        raise CheckpointError(f"--resume: no checkpoint at {ckpt_path} to resume from")
    if cfg.train.init_checkpoint:
        _load_init(model, cfg.train.init_checkpoint, dist_info)
    return 0, None


def _log(log_file: Path, record: dict[str, Any], total: float, bar, dist_info: DistInfo, iters: int) -> None:
    """Append ``record`` to the JSON-lines log; show the loss on the bar, or print it without a terminal."""
    with open(log_file, "a") as f:
        f.write(dumps(record) + "\n")
    bar.set_postfix(loss=f"{total:.3f}")
    if not progress_enabled(dist_info):
        print(f"iter {record['iter']}/{iters} loss {total:.4f} lr {record['lr']:.2e} "
              f"{record['s_per_iter']:.2f} s/it", flush=True)


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """ConfigError when a new run would go into ``out_dir`` that already holds one (a checkpoint or a training
    log), naming ``--resume``, a new ``out_dir`` and ``--overwrite``; with ``overwrite`` the old log goes."""
    ckpt, log = out_dir / LAST, out_dir / LOG
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is an existing file, not a folder: name a folder for the run "
                          f"(--set out_dir=...)")
    if resume or not (ckpt.is_file() or log.is_file()):
        return
    if overwrite:
        log.unlink(missing_ok=True)
        return
    held = f"a checkpoint of iteration {int(load_checkpoint(ckpt)['iter'])}" if ckpt.is_file() else "a training log"
    raise ConfigError(f"out_dir {out_dir} already holds a run ({held}): continue it with --resume, train into "
                      f"another folder (--set out_dir=...), or replace it with --overwrite")


def trim_log(log: Path, last_iter: int) -> None:
    """Keep the records of iterations up to ``last_iter`` in the JSON-lines log ``log`` (a resumed run redoes
    the ones after its checkpoint, so each iteration is logged once), atomically."""
    if not log.is_file():
        return
    kept = [line for line in log.read_text().splitlines() if line.strip() and _log_iter(line) <= last_iter]
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log)


def _log_iter(line: str) -> float:
    try:
        return float(json.loads(line).get("iter", math.inf))
    except ValueError:
        return math.inf  # a line cut short: dropped


def set_training_rule(model: nn.Module, tc) -> None:
    """The exit rule the scheme trains with: none for ``dense`` (p0 1), else ``train.p0`` or, with
    ``train.exit_mode`` budget, ``train.exit_ratio``/``p_min``. A token-reduction alternative has no early
    exit; its checkpoint still records the scheme's p0."""
    p0 = 1.0 if tc.scheme == "dense" else tc.p0
    if isinstance(model, DToPSegmentor) and tc.scheme != "dense" and tc.exit_mode == "budget":
        model.set_budget(tc.exit_ratio, tc.p_min)
    elif isinstance(model, DToPSegmentor):
        model.set_p0(p0)
    else:
        model.cfg.p0 = p0


def _announce(cfg: ExperimentConfig, start_iter: int, resumed: bool, dist_info: DistInfo) -> None:
    """What the main process says before the first iteration: where a resumed run goes on (its log trimmed to
    the checkpoint's iterations) and, without a terminal (no progress bar), what the run will do."""
    tc, out_dir = cfg.train, Path(cfg.out_dir)
    if resumed:
        print(f"resuming from iteration {start_iter} of {tc.iters} ({out_dir / LAST})"
              + ("; nothing left to do (raise train.iters to train on)" if start_iter >= tc.iters else ""), flush=True)
        trim_log(out_dir / LOG, start_iter)
    if not progress_enabled(dist_info) and start_iter < tc.iters:
        print(f"train {tc.scheme}: iterations {start_iter + 1}..{tc.iters}, batch {tc.batch_size}, a line every "
              f"{tc.log_interval} iterations, checkpoints every {tc.ckpt_interval} in {out_dir}", flush=True)


def train(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as configured; returns the path of the final checkpoint (``out_dir/last.pt``). On Ctrl-C (or SIGTERM
    under the CLI) it writes a checkpoint of the last completed iteration, then raises
    :class:`~dtop.errors.Interrupted` saying so (``--resume`` continues). ConfigError when ``out_dir`` already
    holds a run and neither ``resume`` nor ``overwrite`` is set (:func:`check_out_dir`)."""
    cfg.validate()
    tc = cfg.train
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir, resume, overwrite)
    dist_info = init_distributed(tc.device)
    device = resolve_device(tc.device, dist_info)
    torch.manual_seed(tc.seed + dist_info.rank)

    mean, std = normalisation(cfg)  # recorded in the config saved with every checkpoint
    cfg.data.mean, cfg.data.std = list(mean), list(std)
    dataset = experiment_dataset(cfg, cfg.data.train_split, train=True)
    model = experiment_model(cfg, dataset.num_classes)
    dataset.transform.size_divisor = model.backbone.patch_size  # crops padded to whole patches
    set_training_rule(model, tc)
    ckpt_path = out_dir / LAST
    start_iter, state = _start(model, cfg, ckpt_path, resume, dist_info)
    if dist_info.is_main:
        _announce(cfg, start_iter, state is not None, dist_info)
    model.to(device).train()
    run = _Run.build(cfg, model, device, dist_info, state)
    run.saved = start_iter if state is not None else -1
    run.dataset_record = {"name": cfg.data.name, **dataset.meta_record()}
    batches = _loader(dataset, cfg, dist_info, device, start_iter)

    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with deferred_interrupts():
            save_config(cfg, out_dir / "config.yaml")
    bar = tqdm(total=tc.iters, initial=start_iter, desc=f"train {tc.scheme}", disable=not progress_enabled(dist_info))
    t0 = time.time()
    try:
        for it in range(start_iter, tc.iters):
            total, parts = run.step(batches, it)
            done = it + 1
            bar.update(1)
            if dist_info.is_main and (done % tc.log_interval == 0 or done == tc.iters):
                record = {"iter": done, "loss": round(total, 5), "lr": run.optimizer.param_groups[0]["lr"],
                          "s_per_iter": round((time.time() - t0) / (done - start_iter), 4), **parts}
                _log(out_dir / LOG, record, total, bar, dist_info, tc.iters)
            if done % tc.ckpt_interval == 0 or done == tc.iters:
                if dist_info.is_main:
                    run.save(ckpt_path, done)
                if dist_info.world_size > 1:
                    dist.barrier()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under the CLI: save what is done, say how to resume
        bar.close()
        raise _interrupted(e, run, ckpt_path, dist_info) from e
    bar.close()
    if dist_info.world_size > 1:
        dist.destroy_process_group()
    return ckpt_path


def _interrupted(exc: BaseException, run: _Run, ckpt_path: Path, dist_info: DistInfo) -> Interrupted:
    """The interruption ``exc`` with what training had done: the main process first writes (atomically) a
    checkpoint of the last completed iteration unless ``ckpt_path`` already holds it; a second signal
    meanwhile waits for the write to finish."""
    done, iters = run.completed(), run.cfg.train.iters
    if done > max(run.saved, 0) and dist_info.is_main:
        try:
            with deferred_interrupts():
                run.save(ckpt_path, done)
        except KeyboardInterrupt:  # the held second signal: the checkpoint is written, stop as asked
            pass
    if run.saved < 0 and done == 0:
        return Interrupted.wrap(exc, f"stopped before the first of {iters} iterations finished; "
                                     f"no checkpoint written")
    return Interrupted.wrap(exc, f"stopped after iteration {done} of {iters}; checkpoint of iteration "
                                 f"{run.saved if dist_info.is_main else done}: {ckpt_path}", resume=["--resume"])


def _load_init(model: nn.Module, path: str, dist_info: DistInfo) -> None:
    """Initial weights: a dtop checkpoint (trained dense model for @Finetune) or a published
    Segmenter/SegViT checkpoint (converted by :mod:`dtop.convert`)."""
    raw = read_file(path)
    if isinstance(raw, dict) and "model_config" in raw and "model" in raw:
        # a dense checkpoint may lack the weights of a token-reduction alternative (the conv's)
        fresh = check_and_load(model, raw["model"], source=path, may_miss=("reducer.",), grids=recorded_grids(raw))
        if dist_info.is_main and fresh:
            print(f"{path}: left at initialisation: {', '.join(fresh)}")
        return
    report = load_into(model, path)
    if dist_info.is_main and report.get("initialised"):
        print(f"{path}: converted; left at initialisation: {', '.join(report['initialised'])}")
