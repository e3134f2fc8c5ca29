"""The generic trainer: any 2D segmentation network of the registry, any label table, any sampler.

``train_model`` draws batches from a caller-supplied sampler (synthetic images from label maps,
real image/label pairs, phantoms), optimises Dice + cross-entropy on softmax outputs with AdamW and
a warm-up + cosine (or poly) learning-rate schedule, keeps an exponential moving average of the
weights (the shipped weights: steadier than any single step), and writes

* ``<output_dir>/``                        the final :class:`ModelPackage` (fp16 safetensors + manifest)
* ``<work_dir>/checkpoint/``               the latest checkpoint: ``model``, ``ema`` and ``optimizer``
                                           safetensors files plus ``state.json`` (step, optimizer
                                           hyper-parameters, RNG states as tensors, config)
* ``<work_dir>/train_log.csv``             step, loss, learning rate, seconds, validation mean Dice
* ``<work_dir>/validation.json``           every validation result (per-label Dice) by step

Nothing is pickled: tensors go through safetensors, everything else through JSON. Resuming from a
checkpoint continues exactly: the same weights come out as from an uninterrupted run on the same
device, because every source of randomness (the sampler's generator, torch's global RNG) is saved.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from dafne_logic.core.atomic import atomic_directory, atomic_write_text
from dafne_logic.core.errors import Cancelled, DafneError, InputError
from dafne_logic.core.numbers import strict_json
from dafne_logic.inference.manifest import Manifest
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.inference.networks import build_network, resolve_device

log = logging.getLogger(__name__)

SampleBatch = Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
"""``sample_batch(generator, batch_size) -> (images (B,1,H,W) float32, targets (B,H,W) int64)``.

Targets hold model classes (0 = background, 1..N). A sampler used with a partial-label loss may
also emit the loss's coarse-group codes (values >= N + 1). All randomness must come from
``generator`` (and torch's global RNG), or resuming cannot reproduce the uninterrupted run."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits (B,C,H,W), targets (B,H,W) int64) -> scalar``."""

Validate = Callable[[nn.Module], dict[str, float]]
"""``validate(network in eval mode) -> metrics``; ``"mean_dice"`` is logged in the CSV."""

Progress = Callable[[int, int, dict[str, float]], None]
"""``progress(step done, total steps, {"loss": ..., "lr": ...})`` after every step."""

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "state.json"
LOG_NAME = "train_log.csv"
VALIDATION_NAME = "validation.json"
LOG_FIELDS = ("step", "loss", "lr", "seconds", "mean_dice")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all JSON-serialisable; stored in every checkpoint)."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "poly" (power 0.9)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision, used on CUDA only
    ema_decay: float | None = 0.995  # exponential moving average of the weights; None disables
    checkpoint_every: int = 200
    val_every: int = 0  # 0: validate only at the end (when a validate callable is given)
    log_every: int = 10
    # Wall-clock budget in seconds, set-up included: the schedule's length is fitted to it once from
    # the measured step time (see _TimeBudget), and the run ends early if it still runs out. None:
    # ``steps`` decide. Not with resume.
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("steps and batch size must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"the learning rate must be a positive number, not {self.lr}")
        if self.schedule not in ("cosine", "poly"):
            raise InputError(f"unknown learning-rate schedule {self.schedule!r} (cosine or poly)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise InputError(f"EMA decay must lie in (0, 1), got {self.ema_decay}")
        if self.time_limit_s is not None and not (math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
            raise InputError(f"the time limit must be a positive number of seconds, got {self.time_limit_s}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _math_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint. The number of steps may change
    (the schedule then anneals over the new total), as may the device and the bookkeeping intervals."""
    free = {"steps", "device", "checkpoint_every", "val_every", "log_every", "time_limit_s"}
    return {k: v for k, v in config.to_json().items() if k not in free}


# Share of a time limit kept free for validation, checkpoints and saving the package.
TIME_RESERVE = 0.1
# Steps left out of the step-time measurement: the first ones pay for allocator and kernel warm-up.
UNTIMED_STEPS = 5
# A time-limited schedule is fitted once this share of the limit has passed (and the warm-up is over).
FIT_AFTER_SHARE = 0.1
# ... and looked at once more when this share has passed: if the steps since the fit, on average, went
# so slowly that the run would not end within its limit at all (runs sharing one device start at
# different times), it is shortened so that its learning rate still decays before the cut. Half the
# limit, and a whole limit's overrun, leave a CPU's passing slow spells alone (another job for a few
# minutes: trial v11 ran 280 steps at twice its usual step time and still ended at 86 % of its limit).
REFIT_AT_SHARE = 0.5
REFIT_WHEN_PAST_SHARE = 1.0


def steps_within(limit_s: float, elapsed_s: float, done: int, seconds_per_step: float, ceiling: int) -> int:
    """Total steps of a run that has done ``done`` steps in ``elapsed_s`` seconds, when the rest go at
    ``seconds_per_step`` and everything must end within ``limit_s`` less :data:`TIME_RESERVE`;
    never more than ``ceiling`` and never fewer than ``done`` (nothing left: stop now)."""
    left = limit_s * (1.0 - TIME_RESERVE) - elapsed_s
    more = int(left / seconds_per_step) if left > 0 and seconds_per_step > 0 else 0
    return max(done, min(ceiling, done + more))


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then cosine or poly decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "poly":
        return config.lr * (1.0 - t) ** 0.9
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def default_loss(n_classes: int) -> LossFn:
    """MONAI Dice + cross-entropy on softmax; Dice is pooled over the batch so that a class absent
    from one sample does not dominate the loss."""
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if int(target.max()) >= n_classes:
            raise ValueError(f"target holds class {int(target.max())} but the network has {n_classes} outputs")
        return dice_ce(logits.float(), target.unsqueeze(1))

    return loss


# --- checkpoints ---------------------------------------------------------------------------------


def _state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into flat tensors (``<param index>.<key>``) and JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    rng = {"sampler": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save_checkpoint(work_dir: Path, step: int, model: nn.Module, ema: dict[str, torch.Tensor] | None,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    scaler: torch.amp.GradScaler | None, config: TrainConfig) -> Path:
    """Write ``work_dir/checkpoint`` atomically (safetensors + JSON only); returns its path."""
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    state = {
        "step": step,
        "config": config.to_json(),
        "optimizer": opt_meta,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "has_ema": ema is not None,
    }
    target = work_dir / CHECKPOINT_DIR
    with atomic_directory(target, marker=STATE_NAME, what="a training checkpoint folder") as tmp:
        (tmp / "model.safetensors").write_bytes(save_safetensors_bytes(_state_to_cpu(model.state_dict())))
        if ema is not None:
            (tmp / "ema.safetensors").write_bytes(save_safetensors_bytes(_state_to_cpu(ema)))
        if opt_tensors:
            (tmp / "optimizer.safetensors").write_bytes(save_safetensors_bytes(opt_tensors))
        (tmp / "rng.safetensors").write_bytes(save_safetensors_bytes(_rng_tensors(generator)))
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    return target


def _load_checkpoint(work_dir: Path, model: nn.Module, ema: dict[str, torch.Tensor] | None,
                     optimizer: torch.optim.Optimizer, generator: torch.Generator,
                     scaler: torch.amp.GradScaler | None, device: torch.device) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from."""
    folder = work_dir / CHECKPOINT_DIR
    if not (folder / STATE_NAME).is_file():
        raise InputError(f"{folder}: no checkpoint to resume from")
    try:
        state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
        model.load_state_dict(_read_tensors(folder / "model.safetensors"), strict=True)
        if ema is not None:
            if not state.get("has_ema"):
                raise InputError(f"{folder}: checkpoint has no weight average but the config asks for one")
            for key, value in _read_tensors(folder / "ema.safetensors").items():
                ema[key].copy_(value)
        opt_file = folder / "optimizer.safetensors"
        opt_tensors = _read_tensors(opt_file) if opt_file.is_file() else {}
        optimizer.load_state_dict(_optimizer_state(opt_tensors, state["optimizer"]))
        rng = _read_tensors(folder / "rng.safetensors")
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise InputError(f"{folder}: checkpoint unreadable or from another network ({exc})") from exc
    generator.set_state(rng["sampler"])
    torch.set_rng_state(rng["torch_cpu"])
    if device.type == "cuda":
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, read into memory. Not memory-mapped (``safetensors.torch.load_file``):
    the optimiser keeps the loaded tensors, and Windows cannot replace or delete a mapped file, so the
    first checkpoint after ``--resume`` would fail there."""
    return load_safetensors_bytes(path.read_bytes())


# --- logs ----------------------------------------------------------------------------------------


class _TrainLog:
    """The CSV log of loss and validation Dice, plus the JSON list of validation results.

    On resume, rows written after the checkpoint (progress that the checkpoint does not hold) are
    dropped so the log reads as one continuous run."""

    def __init__(self, work_dir: Path, resume_step: int | None):
        self.csv_path = work_dir / LOG_NAME
        self.validation_path = work_dir / VALIDATION_NAME
        self.rows: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        if resume_step is not None:
            if self.csv_path.is_file():
                with self.csv_path.open(newline="", encoding="utf-8") as f:
                    self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if self.validation_path.is_file():
                entries = json.loads(self.validation_path.read_text(encoding="utf-8"))
                self.validation = [e for e in entries if int(e["step"]) <= resume_step]
        self._write_csv()

    def _write_csv(self) -> None:
        lines = [",".join(LOG_FIELDS)]
        lines += [",".join(str(row.get(k, "")) for k in LOG_FIELDS) for row in self.rows]
        self._write(self.csv_path, "\n".join(lines) + "\n")

    @staticmethod
    def _write(path: Path, text: str) -> None:
        """Rewrite a log file; a failure (the CSV open in Excel on Windows) costs a warning, not the
        run: every row is kept and the next write catches up."""
        try:  # no waiting for a file held open: the log is rewritten every few steps
            atomic_write_text(path, text, replace_retry_s=0.0)
        except OSError as exc:
            log.warning("could not update %s (%s); trying again at the next log step", path, exc.strerror or exc)

    def add(self, step: int, loss: float | None, lr: float, seconds: float, metrics: dict[str, float] | None) -> None:
        row = {"step": step, "loss": "" if loss is None else f"{loss:.6f}", "lr": f"{lr:.6g}",
               "seconds": f"{seconds:.1f}", "mean_dice": ""}
        if metrics is not None:
            row["mean_dice"] = f"{metrics.get('mean_dice', float('nan')):.4f}"
            self.validation.append({"step": step, **metrics})
            self._write(self.validation_path, json.dumps(strict_json(self.validation), indent=1) + "\n")
        self.rows.append(row)
        self._write_csv()


# --- the loop ------------------------------------------------------------------------------------


def _new_ema(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


@torch.no_grad()
def _update_ema(ema: dict[str, torch.Tensor], model: nn.Module, decay: float, step: int) -> None:
    # Early on, average with a shorter memory (1 + step) / (10 + step) so the average is not
    # dominated by the random initialisation.
    d = min(decay, (1.0 + step) / (10.0 + step))
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            ema[key].lerp_(value.float(), 1.0 - d)
        else:
            ema[key].copy_(value)


def _evaluation_network(manifest: Manifest, weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    net = build_network(manifest.architecture)
    net.load_state_dict(weights, strict=True)
    return net.to(device).eval()


def _check_batch(images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 1 or targets.ndim != 3:
        raise ValueError(f"sampler must return (B,1,H,W) images and (B,H,W) targets, got "
                         f"{tuple(images.shape)} and {tuple(targets.shape)}")
    if images.shape[0] != batch_size or images.shape[0] != targets.shape[0] or images.shape[2:] != targets.shape[1:]:
        raise ValueError(f"sampler returned images {tuple(images.shape)} and targets {tuple(targets.shape)} "
                         f"for batch size {batch_size}")


def default_work_dir(output_dir: str | Path) -> Path:
    """Where checkpoints and logs of a run writing ``output_dir`` go: ``<output_dir>.training``."""
    output_dir = Path(output_dir)
    return output_dir.parent / f"{output_dir.name}.training"


def train_model(
    manifest: Manifest,
    sample_batch: SampleBatch,
    config: TrainConfig,
    output_dir: str | Path,
    progress: Progress | None = None,
    validate: Validate | None = None,
    resume: bool = False,
    init_state: dict[str, torch.Tensor] | None = None,
    cancel: Callable[[], bool] | None = None,
    loss_fn: LossFn | None = None,
    work_dir: str | Path | None = None,
) -> ModelPackage:
    """Train a network and save it as a model package at ``output_dir``.

    Args:
        manifest: template of the package (architecture, labels, preprocessing, provenance); its
            weight fields are filled in on save. ``provenance["training"]`` receives the config,
            the steps done and the last validation result.
        sample_batch: see :data:`SampleBatch`.
        config: hyper-parameters; ``config.seed`` seeds the sampler's generator and the weights.
        output_dir: the package folder, written atomically at the end.
        progress: called after every step (see :data:`Progress`).
        validate: scores the (averaged) network; called every ``val_every`` steps and at the end.
        resume: continue from ``work_dir/checkpoint``; ``config`` must match the checkpoint's except
            for the number of steps (a longer or shorter schedule), the device and the intervals.
        init_state: starting weights (e.g. a parent model's ``state_dict``) instead of random ones.
        cancel: polled between steps; when it returns True a checkpoint is written and
            :class:`Cancelled` is raised, so ``resume=True`` continues without loss of progress.
        loss_fn: replaces the default Dice + CE loss (e.g. a partial-label loss).
        work_dir: checkpoints and logs (default ``<output_dir>.training``).

    Returns:
        The saved package (weights as fp32 tensors on CPU, fp16 on disk).
    """
    began = time.monotonic()  # a time limit counts the set-up (network, device, checkpoint) too
    if config.time_limit_s is not None and resume:
        raise InputError("a time limit cannot be combined with resuming: give the total number of steps instead")
    output_dir = Path(output_dir)
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(output_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    loss_fn = loss_fn or default_loss(manifest.labels.n_classes)
    run = _TrainingRun.start(manifest, config, init_state)
    start = _resume_checkpoint(work_dir, run, config) if resume else 0
    if start > config.steps:  # the loop would not run and the checkpoint would be saved as an earlier step
        raise InputError(f"{work_dir}: the checkpoint is at step {start}, past the {config.steps} steps asked; give "
                         f"--steps {start} or more to continue it")
    train_log = _TrainLog(work_dir, start if resume else None)

    def run_validation() -> dict[str, float]:
        assert validate is not None
        with torch.no_grad():
            return validate(_evaluation_network(manifest, run.averaged_weights(), run.device))

    running: list[float] = []
    metrics: dict[str, float] | None = None
    budget = _TimeBudget.start(config, began) if config.time_limit_s else None  # never resumed: from step 0
    steps_asked = config.steps
    step = start
    while step < config.steps:
        if cancel is not None and cancel():
            run.save_checkpoint(work_dir, step, config)
            raise Cancelled(f"training cancelled at step {step}; resume from {work_dir}")
        lr = learning_rate(config, step)
        images, targets = sample_batch(run.generator, config.batch_size)
        _check_batch(images, targets, config.batch_size)
        running.append(run.optimisation_step(images, targets, loss_fn, lr, step, config))
        done = step + 1
        if budget is not None:
            config = budget.fit(config, done, time.monotonic())
        if progress is not None:
            progress(done, config.steps, {"loss": running[-1], "lr": lr})
        paused = time.monotonic()
        validating = validate is not None and (
            done == config.steps or (config.val_every > 0 and done % config.val_every == 0))
        if validating:
            run.model.eval()
            metrics = run_validation()
            run.model.train()
        if done % config.log_every == 0 or validating or done == config.steps:
            train_log.add(done, sum(running) / len(running) if running else None, lr,
                          time.monotonic() - began, metrics if validating else None)
            running = []
        if config.checkpoint_every > 0 and done % config.checkpoint_every == 0 and done < config.steps:
            run.save_checkpoint(work_dir, done, config)
        if budget is not None:  # validation and checkpoints are not step time
            budget.paused_s += time.monotonic() - paused
        step = done

    if start >= config.steps and validate is not None:
        metrics = run_validation()
    run.save_checkpoint(work_dir, config.steps, config)
    return _save_package(manifest, run, config, metrics, output_dir, steps_asked if budget is not None else None)


@dataclass
class _TimeBudget:
    """Fits a run's length to ``TrainConfig.time_limit_s`` from the measured step time.

    The total is fitted once, when the warm-up is over and :data:`FIT_AFTER_SHARE` of the limit has
    passed: late enough to see the device as it will be shared (runs started together reach their
    steps at different times), early enough that the cosine, still flat there, barely jumps. The
    step time leaves out validation and checkpoints (``paused_s``); the reserve pays for them. When
    :data:`REFIT_AT_SHARE` of the limit has passed, if the steps since the fit ran so much slower on
    average that the run would end past :data:`REFIT_WHEN_PAST_SHARE` of the limit, it is shortened
    once from their step time (never lengthened), so that the cosine still decays to its end. Once
    the limit less half the reserve is spent, the run ends at that step, which then gets the final
    validation and log row; a device that got faster only ends the run a little early.
    """

    limit_s: float
    ceiling: int  # the steps asked for: never more
    began: float  # time.monotonic() when train_model started
    fit_after: int  # the first step the fit may come at
    window_step: int  # the step time is measured from this step ...
    window_time: float | None = None  # ... at this time (None: not yet reached)
    paused_s: float = 0.0  # validation and checkpoint time since then
    fitted: bool = False
    fit_step: int = 0  # the step, time and paused_s of the fit, from which a refit measures
    fit_time: float = 0.0
    fit_paused_s: float = 0.0
    looked_again: bool = False

    @classmethod
    def start(cls, config: TrainConfig, began: float) -> _TimeBudget:
        """The budget of a run from step 0 (a time limit is never resumed)."""
        assert config.time_limit_s is not None
        return cls(config.time_limit_s, config.steps, began, fit_after=max(config.warmup_steps, UNTIMED_STEPS + 5),
                   window_step=UNTIMED_STEPS)

    def fit(self, config: TrainConfig, done: int, now: float) -> TrainConfig:
        """``config`` after step ``done`` at time ``now``: fitted when due, cut when the time is spent."""
        elapsed = now - self.began
        if done == self.window_step:
            self.window_time, self.paused_s = now, 0.0
        if (not self.fitted and self.window_time is not None and done >= self.fit_after
                and elapsed >= FIT_AFTER_SHARE * self.limit_s):
            self.fitted = True
            self.fit_step, self.fit_time, self.fit_paused_s = done, now, self.paused_s
            per_step = (now - self.window_time - self.paused_s) / max(1, done - self.window_step)
            total = steps_within(self.limit_s, elapsed, done, per_step, self.ceiling)
            log.info("time limit %.0f s: %.3f s a step, %d steps of %d fit", self.limit_s, per_step, total, self.ceiling)
            return replace(config, steps=total)
        if self.fitted and not self.looked_again and done > self.fit_step and elapsed >= REFIT_AT_SHARE * self.limit_s:
            self.looked_again = True
            per_step = (now - self.fit_time - (self.paused_s - self.fit_paused_s)) / (done - self.fit_step)
            if elapsed + (config.steps - done) * per_step > REFIT_WHEN_PAST_SHARE * self.limit_s:
                total = steps_within(self.limit_s, elapsed, done, per_step, config.steps)
                log.info("time limit %.0f s: steps slowed to %.3f s, %d steps of %d refit", self.limit_s, per_step,
                         total, config.steps)
                return replace(config, steps=total)
        if done < config.steps and elapsed > self.limit_s * (1.0 - TIME_RESERVE / 2):
            log.warning("time limit %.0f s reached at step %d of %d: stopping here", self.limit_s, done, config.steps)
            return replace(config, steps=done)
        return config


@dataclass
class _TrainingRun:
    """What one training run changes step by step: the network, its moving average, the optimiser,
    the sampler's random generator and the mixed-precision scaler (CUDA fp16 only)."""

    model: nn.Module
    ema: dict[str, torch.Tensor] | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype

    @classmethod
    def start(cls, manifest: Manifest, config: TrainConfig, init_state: dict[str, torch.Tensor] | None) -> _TrainingRun:
        """Seeded fresh network (or ``init_state``'s weights) on ``config.device``, step 0."""
        device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed + 1)
        model = build_network(manifest.architecture)
        if init_state is not None:
            model.load_state_dict(init_state, strict=True)
        model.to(device).train()
        ema = _new_ema(model) if config.ema_decay is not None else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        use_amp = config.amp and device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
        return cls(model, ema, optimizer, generator, scaler, device, use_amp, amp_dtype)

    def averaged_weights(self) -> dict[str, torch.Tensor]:
        """The weights to validate and ship: the moving average when there is one."""
        if self.ema is not None:
            return self.ema
        return {k: v.detach().float() for k, v in self.model.state_dict().items()}

    def optimisation_step(self, images: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, lr: float,
                          step: int, config: TrainConfig) -> float:
        """One gradient step at learning rate ``lr`` on a batch; returns its loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.model(images)
        loss = loss_fn(logits.float(), targets)
        if not torch.isfinite(loss):
            raise DafneError(f"training diverged at step {step + 1} (loss {loss.item()}); lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            _update_ema(self.ema, self.model, config.ema_decay, step)  # type: ignore[arg-type]
        return float(loss.detach())

    def save_checkpoint(self, work_dir: Path, step: int, config: TrainConfig) -> None:
        save_checkpoint(work_dir, step, self.model, self.ema, self.optimizer, self.generator, self.scaler, config)


def _resume_checkpoint(work_dir: Path, run: _TrainingRun, config: TrainConfig) -> int:
    """Load ``work_dir``'s checkpoint into ``run``; returns the step to continue from (0 without one).

    Raises:
        InputError: the checkpoint was made with other settings than the schedule's length, the
            device and the intervals.
    """
    state_file = work_dir / CHECKPOINT_DIR / STATE_NAME
    saved = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else None
    if saved is not None and _math_settings(TrainConfig.from_json(saved["config"])) != _math_settings(config):
        raise InputError(f"{work_dir}: the checkpoint was made with other settings; resume with the same "
                         f"ones (only the number of steps, the device and the checkpoint, validation and "
                         f"log intervals may change) or start a new run")
    start = _load_checkpoint(work_dir, run.model, run.ema, run.optimizer, run.generator, run.scaler, run.device)
    log.info("resuming at step %d of %d from %s", start, config.steps, work_dir / CHECKPOINT_DIR)
    return start


def _save_package(manifest: Manifest, run: _TrainingRun, config: TrainConfig, metrics: dict[str, float] | None,
                  output_dir: Path, steps_asked: int | None = None) -> ModelPackage:
    """Record the run in ``manifest.provenance["training"]`` and save the averaged weights at ``output_dir``
    (``steps_asked``: the most steps a time-limited run was allowed; its config holds the steps it ran)."""
    manifest.provenance = {
        **manifest.provenance,
        "training": {
            **manifest.provenance.get("training", {}),
            "config": config.to_json(),
            "steps_done": config.steps,
            **({"steps_asked": steps_asked} if steps_asked is not None else {}),
            "weights": "exponential moving average" if run.ema is not None else "last step",
            "device": str(run.device),
            "final_validation": metrics,
        },
    }
    weights = {k: v.detach().to("cpu").float().clone() for k, v in run.averaged_weights().items()}
    package = ModelPackage(manifest, weights)
    package.save(output_dir)
    return package
