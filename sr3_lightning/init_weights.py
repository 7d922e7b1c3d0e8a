"""Where a fine-tuning run starts from: its weights and optimizer state, from one of our ``.ckpt`` files
or a reference ``*_gen.pth`` / ``*_opt.pth`` pair, loaded strictly into the configured UNet."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sr3_lightning.checkpoints import (
    CheckpointError,
    check_shapes,
    find_reference_config,
    load_reference,
    read_reference_config,
    torch_load,
    unstored_defaults,
)
from sr3_lightning.diffusion.schedule import Schedule, make_schedule
from sr3_lightning.models.unet import UNet, UNetConfig

log = logging.getLogger(__name__)

# Optimizer group keys that pick a kernel, not an optimisation setting (fused is re-chosen at train start).
KERNEL_CHOICES = frozenset({"fused", "foreach", "capturable", "differentiable"})


def take_over_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: str) -> list[str]:
    """Load the moments and step counts of ``state``, keeping the optimizer's configured settings.

    ``Optimizer.load_state_dict`` alone would also bring back the saved lr, betas, eps and weight decay,
    silently overriding the run's config. Returns the settings that differed, as ``lr=1e-05 (saved 0.0001)``.
    """
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"{source}: its optimizer state does not fit this run's optimizer ({err}); "
            "set model.init_optimizer=false to start with fresh moments."
        ) from None
    differed = []
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        for key, value in settings.items():
            if key not in KERNEL_CHOICES and key in group and str(group[key]) != str(value):
                differed.append(f"{key}={value} (saved {group[key]})")
        group.update(settings)
    return differed


@dataclass
class InitWeights:
    """Weights (and optimizer state) to start a run from, with a line saying where they came from."""

    optimizer_state: dict | None
    description: str
    schedule: Schedule | None  # the noise schedule it was trained with, where the file says
    schedule_spec: dict | None

    def schedule_differs(self, schedule: Schedule) -> bool:
        """True when ``schedule``'s noise levels are not the ones these weights were trained on."""
        if self.schedule is None:
            return False
        theirs, ours = self.schedule.alphas_cumprod, schedule.alphas_cumprod.cpu()
        return theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=0)


def resolve_reference_pair(source: str | Path) -> tuple[Path, Path | None]:
    """``X`` / ``X_gen.pth`` -> (``X_gen.pth``, ``X_opt.pth`` when it exists): the reference's naming."""
    text = str(source)
    prefix = text.removesuffix(".pth").removesuffix("_gen").removesuffix("_opt")
    gen, opt = Path(prefix + "_gen.pth"), Path(prefix + "_opt.pth")
    if not gen.is_file():
        raise CheckpointError(
            f"init_from={source}: {gen} does not exist. Give a reference checkpoint prefix "
            "(e.g. checkpoints/I640000_E37 for I640000_E37_gen.pth) or one of our .ckpt files."
        )
    return gen, opt if opt.is_file() else None


def load_init_weights(source: str | Path, unet: UNet) -> InitWeights:
    """Load ``source`` (our ``.ckpt`` or a reference prefix) into ``unet`` strictly, checking every shape."""
    path = Path(source)
    if path.suffix == ".ckpt":
        ckpt = torch_load(path, "checkpoint")
        state = ckpt.get("state_dict", {})
        weights = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        if not weights:
            raise CheckpointError(
                f"{path}: no unet.* weights in its state_dict; is it an sr3-lightning checkpoint?"
            )
        hp = ckpt.get("hyper_parameters", {})
        check_shapes(unet, weights, path, fix=unet_fix(hp.get("unet"), unet.config))
        unet.load_state_dict(weights, strict=True)
        opt_states = ckpt.get("optimizer_states") or [None]
        keys = {
            "kind": "beta_schedule",
            "num_timesteps": "num_timesteps",
            "start": "beta_start",
            "end": "beta_end",
        }
        spec = {k: hp[name] for k, name in keys.items()} if all(n in hp for n in keys.values()) else None
        schedule = make_schedule(**spec) if spec else None
        return InitWeights(opt_states[0], f"{path} (step {ckpt.get('global_step', 0)})", schedule, spec)
    gen, opt = resolve_reference_pair(source)
    ref = load_reference(gen, opt, config=unet.config)
    weights = ref.unet.state_dict()
    check_norm_groups(unet.config, gen, weights)
    unet.load_state_dict(weights, strict=True)
    description = f"reference {gen} (iteration {ref.step}, epoch {ref.epoch})"
    return InitWeights(ref.optimizer_state, description, ref.schedule, ref.schedule_spec)


def unet_differences(trained: dict[str, Any], configured: dict[str, Any]) -> str:
    """The model.unet values one of our checkpoints was trained with where the config differs, as
    ``inner_channel: 16 (config: 8), ...``; empty when they agree."""

    def same(a: Any, b: Any) -> bool:
        return (list(a) if isinstance(a, tuple | list) else a) == (
            list(b) if isinstance(b, tuple | list) else b
        )

    return ", ".join(
        f"{k}: {v} (config: {configured[k]})"
        for k, v in trained.items()
        if k in configured and not same(v, configured[k])
    )


def unet_fix(trained: Any, configured: UNetConfig) -> str:
    """How to make the config's UNet fit one of our checkpoints: the model.unet values it was trained with."""
    differ = unet_differences(trained, dataclasses.asdict(configured)) if isinstance(trained, dict) else ""
    if not differ:
        return "The checkpoint has another architecture than the config; set model.unet to the one it had."
    return f"It was trained with model.unet {differ}; set model.unet to match."


def check_norm_groups(config: UNetConfig, gen: Path, weights: dict[str, torch.Tensor]) -> None:
    """GroupNorm groups are not in the weights: any divisor of the widths loads, and a wrong one changes
    every output. A config JSON beside the checkpoint settles it (an error); a published layout hints."""
    beside = _norm_groups_beside(gen)
    if beside is not None:
        path, trained = beside
        if trained != config.norm_groups:
            raise CheckpointError(
                f"model.unet.norm_groups={config.norm_groups}, but {path} (beside {gen.name}) trained it "
                f"with {trained}: set model.unet.norm_groups: {trained}"
            )
        return
    published, values = unstored_defaults(weights)
    if published and values["norm_groups"] != config.norm_groups:
        log.warning(
            "%s has the layout of the reference's %s, which uses GroupNorm %d groups, but "
            "model.unet.norm_groups is %d: every output differs unless it was trained that way. "
            "Set model.unet.norm_groups: %d",
            gen,
            published,
            values["norm_groups"],
            config.norm_groups,
            values["norm_groups"],
        )


def _norm_groups_beside(gen: Path) -> tuple[Path, int] | None:
    """The GroupNorm groups of the reference config JSON beside ``gen``, when one is there and readable."""
    path = find_reference_config(gen)
    if path is None:
        return None
    try:
        return path, read_reference_config(path)[0].norm_groups
    except CheckpointError as err:
        log.warning("%s; GroupNorm groups not checked against it", err)
        return None
