"""The rules a RunConfig must keep: ranges, and fields that contradict each other.

Each broken rule is a ConfigError with one line: `key: value is invalid: the rule, and the fix`.
RunConfig runs `check` on construction (config.py); the sweep file's own keys use `rule` and
`only_time_field` too (scale.py).
"""

from __future__ import annotations

import dataclasses
import math
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrib import faults
from distrib.errors import ConfigError

if TYPE_CHECKING:
    from distrib.config import RunConfig


def check(cfg: RunConfig) -> None:
    """ConfigError for the first rule `cfg` breaks."""
    _check_finite(cfg)
    _check_ranges(cfg)
    _check_recovery(cfg)
    _check_runnable(cfg)


def _check_finite(cfg: RunConfig) -> None:
    """Every float field is finite. No field gives inf or nan a meaning: an infinite lr trains to a
    NaN loss, an infinite timeout overflows in Ray and datetime (whole milliseconds), and nan
    would fail a range check with a misleading rule (every comparison with nan is False)."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        rule(not isinstance(value, float) or math.isfinite(value), field.name, value,
             f"must be a finite number (not .inf or .nan), e.g. the default {field.default}")


def _check_runnable(cfg: RunConfig) -> None:
    """Values each in range that still cannot run."""
    # resnet18's last stage is image_size / 32 pixels a side: a BatchNorm there needs 2+ values per channel.
    side = -(-cfg.image_size // 32)
    stats_batch = cfg.batch_size_per_worker * (cfg.num_workers if cfg.batchnorm == "sync" else 1)
    rule(cfg.batchnorm == "frozen" or stats_batch * side * side > 1, "batch_size_per_worker",
         cfg.batch_size_per_worker, f"BatchNorm in training needs 2+ values per channel, and at image_size "
         f"{cfg.image_size} resnet18's last stage has 1 per image: raise the batch or image_size, or use "
         "batchnorm: frozen (or sync with 2+ workers)")


def rule(ok: bool, key: str, value: Any, text: str) -> None:
    """ConfigError `key: value is invalid: text` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {value!r} is invalid: {text}")


def _check_ranges(cfg: RunConfig) -> None:
    rule(cfg.num_workers >= 1, "num_workers", cfg.num_workers, "must be >= 1")
    rule(cfg.cpus_per_worker > 0, "cpus_per_worker", cfg.cpus_per_worker, "must be > 0")
    rule(0 < cfg.gpus_per_worker <= 1, "gpus_per_worker", cfg.gpus_per_worker,
         "must be in (0, 1]: a replica drives one GPU; below 1 replicas share one")
    rule(cfg.gpus_per_worker == 1 or cfg.backend != "nccl", "backend", cfg.backend,
         "nccl refuses two ranks on one GPU, which gpus_per_worker < 1 allows; use backend: gloo (or auto)")
    rule(cfg.batch_size_per_worker >= 1, "batch_size_per_worker", cfg.batch_size_per_worker, "must be >= 1")
    # resnet18 downsamples 32x; below 32 px the last stage sees less than one pixel.
    rule(cfg.image_size >= 32, "image_size", cfg.image_size, "must be >= 32 (resnet18 downsamples 32x)")
    rule(cfg.num_classes >= 1, "num_classes", cfg.num_classes, "must be >= 1")
    rule(cfg.steps >= 1, "steps", cfg.steps, "must be >= 1")
    rule(cfg.lr > 0, "lr", cfg.lr, "must be > 0")
    _check_schedule(cfg)
    rule(0 <= cfg.momentum < 1, "momentum", cfg.momentum, "must be in [0, 1)")
    rule(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "must be >= 0")
    rule(not cfg.nesterov or cfg.momentum > 0, "nesterov", cfg.nesterov, "needs momentum > 0")
    rule(0 <= cfg.seed < 2**31, "seed", cfg.seed, "must be in [0, 2**31)")
    rule(cfg.loss != "sum" or cfg.data == "synthetic", "loss", cfg.loss,
         "the sum loss needs uniform targets: use data: synthetic, or loss: cross_entropy")
    rule(cfg.data != "folder" or bool(cfg.data_dir), "data_dir", cfg.data_dir,
         "data: folder needs data_dir set to an ImageFolder root")
    rule(cfg.data != "folder" or Path(cfg.data_dir).is_dir(), "data_dir", cfg.data_dir,
         "no such directory; point it at an ImageFolder root (one sub-folder per class)")
    rule(cfg.dataset_size >= 1, "dataset_size", cfg.dataset_size, "must be >= 1")
    _check_evaluation(cfg)
    rule(cfg.decoder != "nvjpeg" or cfg.device != "cpu", "decoder", cfg.decoder,
         "nvjpeg decodes on a GPU; use device: cuda (or auto on a GPU cluster), or decoder: torchvision")
    rule(cfg.loader_workers == "auto" or cfg.loader_workers >= 0, "loader_workers", cfg.loader_workers,
         "must be >= 0, or auto")
    weights_ok = cfg.weights in ("none", "DEFAULT") or cfg.weights.endswith((".pth", ".pt"))
    rule(weights_ok, "weights", cfg.weights, "must be none, DEFAULT or a path to a .pth/.pt file")
    rule(cfg.weights != "DEFAULT" or cfg.num_classes == 1000, "num_classes", cfg.num_classes,
         "weights: DEFAULT has a 1000-class head; set num_classes: 1000")
    rule(cfg.bucket_cap_mb > 0, "bucket_cap_mb", cfg.bucket_cap_mb, "must be > 0")
    rule(cfg.steps_per_call >= 1, "steps_per_call", cfg.steps_per_call, "must be >= 1")
    rule(cfg.calls_in_flight >= 1, "calls_in_flight", cfg.calls_in_flight, "must be >= 1")
    rule(cfg.check_every >= 0, "check_every", cfg.check_every, "must be >= 0 (0 = only at the end)")
    rule(bool(cfg.run_dir), "run_dir", cfg.run_dir, "must not be empty")
    rule(only_time_field(cfg.run_dir), "run_dir", cfg.run_dir,
         "may hold {time} (the start time) and no other {...}; write {{ and }} for a literal brace")
    rule(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be >= 0 (0 = never)")
    rule(cfg.keep_checkpoints >= 1, "keep_checkpoints", cfg.keep_checkpoints, "must be >= 1")
    rule(0 <= cfg.straggler_fraction < 10, "straggler_fraction", cfg.straggler_fraction,
         "must be in [0, 10) (a fraction of the step time; 0 = off)")
    rule(cfg.simulate_step_ms >= 0, "simulate_step_ms", cfg.simulate_step_ms, "must be >= 0 (0 = real replicas)")
    rule(cfg.hang_timeout_factor > 1, "hang_timeout_factor", cfg.hang_timeout_factor, "must be > 1")
    rule(cfg.hang_timeout_min_s > 0, "hang_timeout_min_s", cfg.hang_timeout_min_s, "must be > 0")
    rule(cfg.stop_grace_s > 0, "stop_grace_s", cfg.stop_grace_s, "must be > 0")
    faults.parse(cfg.faults, num_workers=cfg.num_workers)
    rule(cfg.start_timeout_s > 0, "start_timeout_s", cfg.start_timeout_s, "must be > 0")
    rule(cfg.step_timeout_s > 0, "step_timeout_s", cfg.step_timeout_s, "must be > 0")
    rule(not (cfg.device == "cpu" and cfg.backend == "nccl"), "backend", cfg.backend,
         "nccl needs device: cuda; use backend: gloo (or auto) on cpu")
    rule(not (cfg.device == "cpu" and cfg.precision == "fp16"), "precision", cfg.precision,
         "fp16 autocast needs device: cuda; use fp32 or bf16 on cpu")


def _check_recovery(cfg: RunConfig) -> None:
    rule(cfg.max_restarts >= 0, "max_restarts", cfg.max_restarts, "must be >= 0")
    rule(cfg.spare_workers >= 0, "spare_workers", cfg.spare_workers, "must be >= 0")
    rule(0 <= cfg.min_workers <= cfg.num_workers, "min_workers", cfg.min_workers,
         f"must be in [1, num_workers={cfg.num_workers}], or 0 for num_workers (never shrink)")
    rule(cfg.elastic_wait_s >= 0, "elastic_wait_s", cfg.elastic_wait_s, "must be >= 0")
    rule(not cfg.elastic or (cfg.recovery == "heal" and cfg.backend != "nccl"), "min_workers", cfg.min_workers,
         "a group shrinks in a heal, which needs recovery: heal and gloo; or set min_workers: 0")
    # Under sync every forward all-reduces BatchNorm statistics: a rank with more shards than
    # its peers would run more of those collectives than they do.
    rule(not cfg.elastic or cfg.batchnorm != "sync", "min_workers", cfg.min_workers,
         "batchnorm: sync cannot run shrunk; use batchnorm: train or frozen, or min_workers: 0")
    rule(cfg.stall_timeout_s >= 0, "stall_timeout_s", cfg.stall_timeout_s, "must be >= 0 (0 = off)")


def _check_schedule(cfg: RunConfig) -> None:
    rule(0 <= cfg.warmup_steps < cfg.steps, "warmup_steps", cfg.warmup_steps,
         f"must be >= 0 and shorter than the run (steps={cfg.steps})")
    milestones = cfg.lr_milestones
    rule(not milestones or cfg.lr_schedule == "step", "lr_milestones", list(milestones),
         "only lr_schedule: step uses milestones; set lr_schedule: step or drop them")
    rule(cfg.lr_schedule != "step" or bool(milestones), "lr_milestones", list(milestones),
         "lr_schedule: step needs at least one milestone, e.g. [30, 60]")
    rule(all(a < b for a, b in zip(milestones, milestones[1:])), "lr_milestones", list(milestones),
         "must be in increasing order")
    rule(all(0 < m < cfg.steps for m in milestones), "lr_milestones", list(milestones),
         f"each must be a step inside the run (0 < milestone < steps={cfg.steps})")
    rule(0 < cfg.lr_gamma <= 1, "lr_gamma", cfg.lr_gamma, "must be in (0, 1]")
    rule(cfg.base_batch_size >= 1, "base_batch_size", cfg.base_batch_size, "must be >= 1")


def _check_evaluation(cfg: RunConfig) -> None:
    rule(cfg.eval_every >= 0, "eval_every", cfg.eval_every, "must be >= 0 (0 = never)")
    rule(cfg.eval_size >= 1, "eval_size", cfg.eval_size, "must be >= 1")
    rule(not cfg.eval_every or cfg.loss == "cross_entropy", "eval_every", cfg.eval_every,
         "evaluation needs class targets: use loss: cross_entropy")
    rule(0 <= cfg.val_fraction < 1, "val_fraction", cfg.val_fraction, "must be in (0, 1), or 0 for none")
    rule(not (cfg.val_fraction and cfg.val_dir), "val_fraction", cfg.val_fraction,
         "val_dir is set too; hold out a fraction of data_dir or use val_dir, not both")
    rule(cfg.data == "folder" or not (cfg.val_fraction or cfg.val_dir), "data", cfg.data,
         "val_dir and val_fraction are for data: folder; synthetic and fake data make their own held-out set")
    rule(cfg.data != "folder" or not cfg.eval_every or bool(cfg.val_fraction or cfg.val_dir), "eval_every",
         cfg.eval_every, "data: folder needs a held-out set to evaluate: set val_dir or val_fraction")


def only_time_field(template: str) -> bool:
    """Whether str.format(time=...) fills `template`: {time} is its only field, unformatted."""
    try:
        return all(name in (None, "time") and not spec and not conversion
                   for _, name, spec, conversion in string.Formatter().parse(template))
    except ValueError:  # an unmatched brace
        return False
