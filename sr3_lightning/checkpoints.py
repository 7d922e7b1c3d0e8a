"""Read and write the reference SR3 checkpoint format (``*_gen.pth`` + ``*_opt.pth``).

A ``*_gen.pth`` is the reference ``GaussianDiffusion.state_dict()``: 12 float32 schedule buffers, then
``denoise_fn.*`` UNet weights. A ``*_opt.pth`` holds ``{'epoch', 'iter', 'scheduler', 'optimizer'}``,
the Adam state indexed in ``unet.parameters()`` order. Loading walks the keys explicitly and names the
first mismatch; saving writes the same layout back, so a round trip is lossless.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from sr3_lightning.diffusion.schedule import BETA_SCHEDULES, BUFFER_NAMES, Schedule, make_schedule
from sr3_lightning.models.unet import UNet, UNetConfig

PREFIX = "denoise_fn."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what is wrong and how to fix it."""


@dataclass
class ReferenceCheckpoint:
    """A loaded reference checkpoint: our UNet with its weights, the schedule, and the training state."""

    unet: UNet
    schedule: Schedule
    optimizer_state: dict | None
    step: int
    epoch: int
    config: UNetConfig
    schedule_spec: dict


def _torch_load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(
            f"{what} {path} does not exist; check the path (a reference checkpoint is a "
            "pair like I640000_E37_gen.pth / I640000_E37_opt.pth)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{what} {path} could not be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "the file is truncated or not a PyTorch checkpoint. Download it again."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a state dict.")
    return obj


def find_reference_config(gen_path: Path) -> Path | None:
    """A reference-format config JSON next to the checkpoint: ``<prefix>_config.json``, ``<prefix>.json``
    or ``config.json``, where ``<prefix>`` is the file name without ``_gen.pth``."""
    prefix = gen_path.name.removesuffix(".pth").removesuffix("_gen")
    for name in (f"{prefix}_config.json", f"{prefix}.json", "config.json"):
        if (gen_path.parent / name).is_file():
            return gen_path.parent / name
    return None


_STRING_OR_COMMENT = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*')


def strip_json_comments(text: str) -> str:
    """Drop ``//`` comments, whole-line or after a value, as the reference's configs carry them.

    Strings are matched first, so a ``//`` inside one (a URL) stays.
    """
    return _STRING_OR_COMMENT.sub(lambda m: m.group(1) or "", text)


def read_reference_config(path: Path) -> tuple[UNetConfig, dict]:
    """UNet config and training schedule from a reference JSON (``model.unet``, ``model.beta_schedule``)."""
    try:
        model = json.loads(strip_json_comments(Path(path).read_text()))["model"]
        u = model["unet"]
        config = UNetConfig(
            in_channel=u["in_channel"],
            out_channel=u["out_channel"],
            inner_channel=u["inner_channel"],
            norm_groups=u.get("norm_groups", 32),
            channel_multiplier=tuple(u["channel_multiplier"]),
            attn_res=tuple(u["attn_res"]),
            res_blocks=u["res_blocks"],
            dropout=u["dropout"],
            image_size=model["diffusion"]["image_size"],
        )
        sched = model["beta_schedule"]["train"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"config {path} is not a reference SR3 config ({err!r} missing or invalid); "
            "pass the JSON from the reference's config/ folder."
        ) from None
    spec = {
        "kind": sched["schedule"],
        "num_timesteps": sched["n_timestep"],
        "start": sched["linear_start"],
        "end": sched["linear_end"],
    }
    return config, spec


def infer_unet_config(
    weights: dict[str, Tensor], norm_groups: int = 32, dropout: float = 0.2, image_size: int = 128
) -> UNetConfig:
    """Read the architecture off the weights. GroupNorm groups, dropout and the training image size are not
    stored in weights; they default to the reference 16->128 values unless given."""
    try:
        first = weights["downs.0.weight"]
        out = weights["final_conv.block.3.weight"]
    except KeyError as err:
        raise CheckpointError(
            f"missing key {PREFIX}{err.args[0]}: this is not an SR3 UNet checkpoint."
        ) from None
    inner, in_ch = first.shape[0], first.shape[1]
    mults, blocks, attn_levels, level, count = [], [], set(), 0, 0
    i = 1
    while f"downs.{i}.conv.weight" in weights or f"downs.{i}.res_block.block1.block.3.weight" in weights:
        if f"downs.{i}.conv.weight" in weights:
            blocks.append(count)
            level, count = level + 1, 0
        else:
            width = weights[f"downs.{i}.res_block.block1.block.3.weight"].shape[0]
            if count == 0:
                mults.append(width // inner)
            count += 1
            if f"downs.{i}.attn.qkv.weight" in weights:
                attn_levels.add(level)
        i += 1
    blocks.append(count)
    if len(set(blocks)) != 1:
        raise CheckpointError(f"uneven res blocks per level {blocks}: not an SR3 UNet layout.")
    return UNetConfig(
        in_channel=in_ch,
        out_channel=out.shape[0],
        inner_channel=inner,
        norm_groups=norm_groups,
        channel_multiplier=tuple(mults),
        attn_res=tuple(image_size >> lv for lv in sorted(attn_levels)),
        res_blocks=blocks[0],
        dropout=dropout,
        image_size=image_size,
    )


def _schedule_from_buffers(buffers: dict[str, Tensor], spec: dict | None) -> tuple[Schedule, dict]:
    """The named schedule that reproduces the stored buffers exactly, else one rebuilt from them."""
    betas = buffers["betas"]
    candidates = [spec] if spec else []
    start, end = float(betas[0]), float(betas[-1])
    candidates += [
        {"kind": k, "num_timesteps": len(betas), "start": start, "end": end} for k in BETA_SCHEDULES
    ]
    candidates.append({"kind": "linear", "num_timesteps": len(betas), "start": 1e-6, "end": 1e-2})
    for cand in candidates:
        try:
            sched = make_schedule(**cand)
        except ValueError:
            continue
        if all(torch.equal(sched.buffers()[k], buffers[k]) for k in BUFFER_NAMES):
            return sched, cand
    return Schedule.from_buffers(buffers), {"kind": "stored", "num_timesteps": len(betas)}


def _check_shapes(unet: UNet, weights: dict[str, Tensor], source: Path) -> None:
    """Walk the model's keys in order and stop at the first one missing or of another shape."""
    fix = (
        "The checkpoint has another architecture than the config; pass the reference config JSON it was "
        "trained with (--config) or set model.unet to match."
    )
    expected = unet.state_dict()
    for key, value in expected.items():
        if key not in weights:
            raise CheckpointError(
                f"{source}: missing key {PREFIX}{key} (expected shape {tuple(value.shape)}). {fix}"
            )
        if weights[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {PREFIX}{key} has shape {tuple(weights[key].shape)}, the model "
                f"expects {tuple(value.shape)}. {fix}"
            )
    unexpected = [k for k in weights if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected keys, first {PREFIX}{unexpected[0]}. {fix}"
        )


def load_reference(
    gen_path: str | Path,
    opt_path: str | Path | None = None,
    config: str | Path | UNetConfig | None = None,
    norm_groups: int | None = None,
) -> ReferenceCheckpoint:
    """Load a reference ``*_gen.pth`` (and optional ``*_opt.pth``) into our UNet, strictly.

    The architecture comes from ``config`` (a reference JSON or a UNetConfig), else from a reference
    JSON beside the checkpoint (see ``find_reference_config``), else from the weights themselves.
    """
    gen_path = Path(gen_path)
    state = _torch_load(gen_path, "generator checkpoint")
    buffers = {k: state[k] for k in BUFFER_NAMES if k in state}
    weights = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    foreign = [k for k in state if k not in buffers and not k.startswith(PREFIX)]
    if foreign or not weights:
        raise CheckpointError(
            f"{gen_path}: unexpected key {foreign[0] if foreign else '(no denoise_fn.* weights)'}; "
            "a reference *_gen.pth holds schedule buffers and denoise_fn.* weights. "
            "Is this an *_opt.pth or another model?"
        )
    spec = None
    if config is None:
        config = find_reference_config(gen_path)
    if isinstance(config, str | Path):
        config, spec = read_reference_config(Path(config))
    if config is None:
        config = infer_unet_config(weights, norm_groups=norm_groups or 32)
    elif norm_groups is not None:
        config = replace(config, norm_groups=norm_groups)
    _check_group_norm(config, gen_path)
    unet = UNet(config)
    _check_shapes(unet, weights, gen_path)
    unet.load_state_dict(weights, strict=True)
    if len(buffers) == len(BUFFER_NAMES):
        schedule, spec = _schedule_from_buffers(buffers, spec)
    else:
        spec = spec or {"kind": "linear", "num_timesteps": 2000, "start": 1e-6, "end": 1e-2}
        schedule = make_schedule(**spec)
    opt_state, step, epoch = None, 0, 0
    if opt_path is not None:
        opt = _torch_load(Path(opt_path), "optimizer checkpoint")
        if "optimizer" not in opt:
            raise CheckpointError(
                f"{opt_path}: no 'optimizer' entry; a reference *_opt.pth holds "
                "{'epoch', 'iter', 'scheduler', 'optimizer'}. Is this the *_gen.pth?"
            )
        opt_state, step, epoch = opt["optimizer"], int(opt.get("iter", 0)), int(opt.get("epoch", 0))
        _check_optimizer(opt_state, unet, Path(opt_path))
    return ReferenceCheckpoint(unet, schedule, opt_state, step, epoch, config, spec)


def _check_group_norm(config: UNetConfig, source: Path) -> None:
    widths = {config.inner_channel * m for m in config.channel_multiplier} | {config.inner_channel}
    bad = sorted(w for w in widths if w % config.norm_groups)
    if bad:
        raise CheckpointError(
            f"{source}: norm_groups={config.norm_groups} does not divide the channel widths {bad}. "
            "GroupNorm groups are not stored in the weights: "
            "pass the reference config JSON (--config) or --norm-groups."
        )


def _check_optimizer(opt_state: dict, unet: UNet, source: Path) -> None:
    params = list(unet.parameters())
    for index, entry in opt_state.get("state", {}).items():
        if int(index) >= len(params) or entry["exp_avg"].shape != params[int(index)].shape:
            raise CheckpointError(
                f"{source}: Adam state for parameter {index} does not fit the UNet "
                f"({len(params)} parameters); it belongs to another checkpoint."
            )


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


def save_reference(
    gen_path: str | Path,
    unet: UNet,
    schedule: Schedule,
    opt_path: str | Path | None = None,
    optimizer_state: dict | None = None,
    step: int = 0,
    epoch: int = 0,
) -> None:
    """Write the reference layout, so the reference code (and ``load_reference``) reads it back."""
    state = {k: v.detach().cpu() for k, v in schedule.buffers().items()}
    state.update({PREFIX + k: v.detach().cpu() for k, v in unet.state_dict().items()})
    torch.save(state, gen_path)
    if opt_path is not None:
        torch.save({"epoch": epoch, "iter": step, "scheduler": None, "optimizer": optimizer_state}, opt_path)


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
        ckpt = _torch_load(path, "checkpoint")
        state = ckpt.get("state_dict", {})
        weights = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        if not weights:
            raise CheckpointError(
                f"{path}: no unet.* weights in its state_dict; is it an sr3-lightning checkpoint?"
            )
        _check_shapes(unet, weights, path)
        unet.load_state_dict(weights, strict=True)
        opt_states = ckpt.get("optimizer_states") or [None]
        hp = ckpt.get("hyper_parameters", {})
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
    unet.load_state_dict(ref.unet.state_dict(), strict=True)
    description = f"reference {gen} (iteration {ref.step}, epoch {ref.epoch})"
    return InitWeights(ref.optimizer_state, description, ref.schedule, ref.schedule_spec)


def write_checkpoint(path: str | Path, ref: ReferenceCheckpoint, hparams: dict) -> None:
    """Write a reference checkpoint as one of ours: loadable by ``SR3Module.load_from_checkpoint`` and
    usable as ``init_from`` or by ``sample --ckpt``; the Adam state rides along in ``optimizer_states``."""
    import lightning

    torch.save(
        {
            "state_dict": {"unet." + k: v for k, v in ref.unet.state_dict().items()},
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
            "global_step": 0,
            "epoch": 0,
            "optimizer_states": [ref.optimizer_state] if ref.optimizer_state else [],
            "reference": {"iteration": ref.step, "epoch": ref.epoch, "schedule": ref.schedule_spec},
        },
        path,
    )
