"""What a resumed run must keep: the checkpoint it continues from, read with clear errors, and the model
settings it was trained with, compared against the ones given now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sr3_lightning.checkpoint_io import read_checkpoint

# Settings that change speed or bookkeeping, not what is trained: a resumed run may change them freely.
FREE_ON_RESUME = frozenset(
    {
        "channels_last",
        "compile",
        "compile_mode",
        "fused_attention",
        "fused_adam",
        "progress_bar_loss",
        "nonfinite_patience",
        "init_from",
        "init_optimizer",
        "weight_init",
    }
)


def read_checkpoint_head(path: str | Path) -> tuple[int, dict[str, Any]]:
    """The step and saved model settings of a checkpoint to resume or validate (memory-mapped)."""
    ckpt = open_checkpoint(path)
    return int(ckpt["global_step"]), dict(ckpt.get("hyper_parameters") or {})


def open_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint to resume or validate, memory-mapped, with an error naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass a .ckpt from a run's checkpoints/ folder, or leave out "
            "--ckpt_path to use the run directory's newest checkpoint"
        )
    ckpt, problem = read_checkpoint(path)
    if ckpt is None:
        raise ValueError(
            f"checkpoint {path} cannot be read ({problem}); it is truncated or not an sr3-lightning "
            "checkpoint. Pick another file from checkpoints/, or start anew with --fresh=true."
        )
    return ckpt


def _plain(value: Any) -> Any:
    """Tuples as lists and numbers as floats, so a YAML-parsed value equals the saved one."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _with_t_max(hparams: dict[str, Any]) -> dict[str, Any]:
    """``t_max: null`` means T: resolved, so null and T compare equal."""
    if hparams.get("t_max") is None and "num_timesteps" in hparams:
        return {**hparams, "t_max": hparams["num_timesteps"]}
    return hparams


def changed_settings(current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """``model.KEY: now (checkpoint: then)`` for each trained-model setting that differs from the saved."""
    current, saved = _with_t_max(current), _with_t_max(saved)
    changes = []
    for key in sorted(set(current) & set(saved) - FREE_ON_RESUME):
        now, then = current[key], saved[key]
        if key == "unet":  # keys both know: a field added since the checkpoint has its old default
            changes += [
                f"model.unet.{k}: {now[k]} (checkpoint: {then[k]})"
                for k in sorted(set(now) & set(then))
                if _plain(now[k]) != _plain(then[k])
            ]
        elif _plain(now) != _plain(then):
            changes.append(f"model.{key}: {current[key]} (checkpoint: {saved[key]})")
    return changes


# Optimizer param-group entries that are bookkeeping or kernel choice, not training settings.
NOT_OPTIMIZER_SETTINGS = frozenset(
    {"params", "initial_lr", "fused", "foreach", "capturable", "differentiable"}
)


def changed_optimizer_settings(configured: torch.optim.Optimizer, saved_state: dict[str, Any]) -> list[str]:
    """``model.optimizer.KEY: now (checkpoint: then)`` for each hyperparameter (lr, betas, weight decay, ...)
    the configured optimizer sets otherwise than the saved one; a resume restores the saved ones, so a
    change would be silently ignored. Only for runs without an lr scheduler: schedulers move lr (and some
    betas or momentum) during training, so the saved values are not the configured ones."""
    groups = saved_state.get("param_groups") or [{}]
    saved, now = groups[0], configured.defaults
    changes = []
    for key in sorted(set(now) & set(saved) - NOT_OPTIMIZER_SETTINGS):
        then = saved[key]
        if _plain(now[key]) != _plain(then):
            changes.append(f"model.optimizer.{key}: {now[key]} (checkpoint: {then})")
    return changes


def check_resume_settings(
    path: str | Path, current: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
) -> int:
    """The checkpoint's step, after checking the run continues with the settings it was trained with
    (the model's, and with ``optimizer``, the configured optimizer without an lr scheduler, its
    hyperparameters)."""
    ckpt = open_checkpoint(path)
    step = int(ckpt["global_step"])
    changes = changed_settings(current, dict(ckpt.get("hyper_parameters") or {}))
    states = ckpt.get("optimizer_states") or []
    if optimizer is not None and states and not ckpt.get("lr_schedulers"):
        changes += changed_optimizer_settings(optimizer, states[0])
    if changes:
        raise ValueError(
            f"resuming {path} (step {step}) with other model settings than it was trained with: "
            + "; ".join(changes)
            + ". A resumed run keeps its settings: drop these changes, or start a new run with --fresh=true "
            "(moves the old one aside) or another --trainer.default_root_dir (model.init_from starts "
            "from these weights)."
        )
    return step
