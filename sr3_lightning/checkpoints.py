"""Read and write the reference SR3 checkpoint format (``*_gen.pth`` + ``*_opt.pth``).

A ``*_gen.pth`` is the reference ``GaussianDiffusion.state_dict()``: 12 float32 schedule buffers, then
``denoise_fn.*`` UNet weights. A ``*_opt.pth`` holds ``{'epoch', 'iter', 'scheduler', 'optimizer'}``,
the Adam state indexed in ``unet.parameters()`` order. Loading walks the keys explicitly and names the
first mismatch; saving writes the same layout back, so a round trip is lossless.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from sr3_lightning.diffusion.schedule import (
    BETA_SCHEDULES,
    BUFFER_NAMES,
    REFERENCE_SCHEDULE,
    Schedule,
    make_schedule,
)
from sr3_lightning.models.unet import UNet, UNetConfig

PREFIX = "denoise_fn."
UNSTORED = {"norm_groups": 32, "image_size": 128, "dropout": 0.2}  # not in the weights; the 16->128 model's
# The reference's published SR3 configs (its config/*.json), keyed by what their weights show: (in, out,
# inner channels, channel multipliers, res blocks, attention levels). Weights without their JSON take the
# values weights do not store from the config whose layout they have (the 64->512 model: GroupNorm 16).
# Its *_ddpm_* configs build another UNet (which_model_G "ddpm"), which this project does not implement.
PUBLISHED: dict[tuple, tuple[str, dict]] = {
    (6, 3, 64, (1, 2, 4, 8, 8), 2, (3,)): ("sr_sr3_16_128.json", UNSTORED),
    (6, 3, 64, (1, 2, 4, 8, 16), 1, ()): (
        "sr_sr3_64_512.json",
        {"norm_groups": 16, "image_size": 512, "dropout": 0.0},
    ),
    (3, 3, 64, (1, 2, 4, 8, 8), 2, (3,)): ("sample_sr3_128.json", UNSTORED),
}
DDPM_MODULE = "the reference's DDPM-module UNet (which_model_G 'ddpm'), which this project does not implement"
log = logging.getLogger(__name__)


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


def torch_load(path: Path, what: str) -> dict:
    """A state dict from ``path`` (tensors only), or a CheckpointError naming the file and the fix."""
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
        if model.get("which_model_G", "sr3") != "sr3":
            raise CheckpointError(
                f"config {path} builds {DDPM_MODULE}; only the reference's sr3 models load."
            )
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


def unstored_defaults(weights: dict[str, Tensor]) -> tuple[str | None, dict]:
    """The published reference config whose layout the weights have, and its GroupNorm groups, image size
    and dropout; (None, the 16->128 model's values) for any other layout."""
    name, values = PUBLISHED.get(_layout(weights), (None, UNSTORED))
    return name, dict(values)


def _layout(weights: dict[str, Tensor]) -> tuple[int, int, int, tuple[int, ...], int, tuple[int, ...]]:
    """What the weights store of the architecture: (in, out, inner channels, channel multipliers, res blocks
    per level, levels with attention)."""
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
    return in_ch, out.shape[0], inner, tuple(mults), blocks[0], tuple(sorted(attn_levels))


def infer_unet_config(
    weights: dict[str, Tensor], norm_groups: int = 32, dropout: float = 0.2, image_size: int = 128
) -> UNetConfig:
    """Read the architecture off the weights. GroupNorm groups, dropout and the training image size are not
    stored in weights; they default to the reference 16->128 values unless given."""
    in_ch, out_ch, inner, mults, blocks, attn_levels = _layout(weights)
    return UNetConfig(
        in_channel=in_ch,
        out_channel=out_ch,
        inner_channel=inner,
        norm_groups=norm_groups,
        channel_multiplier=mults,
        attn_res=tuple(image_size >> lv for lv in attn_levels),
        res_blocks=blocks,
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
    candidates.append({**REFERENCE_SCHEDULE, "num_timesteps": len(betas)})
    for cand in candidates:
        try:
            sched = make_schedule(**cand)
        except ValueError:
            continue
        if all(torch.equal(sched.buffers()[k], buffers[k]) for k in BUFFER_NAMES):
            return sched, cand
    return Schedule.from_buffers(buffers), {"kind": "stored", "num_timesteps": len(betas)}


REFERENCE_SHAPE_FIX = (
    "The checkpoint has another architecture than the config; pass the reference config JSON it was "
    "trained with (--config) or set model.unet to match."
)


def check_shapes(
    unet: UNet, weights: dict[str, Tensor], source: Path, fix: str = REFERENCE_SHAPE_FIX
) -> None:
    """Walk the model's keys in order and stop at the first one missing or of another shape."""
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
    image_size: int | None = None,
    dropout: float | None = None,
) -> ReferenceCheckpoint:
    """Load a reference ``*_gen.pth`` (and optional ``*_opt.pth``) into our UNet, strictly.

    The architecture comes from ``config`` (a reference JSON or a UNetConfig), else from a reference
    JSON beside the checkpoint (see ``find_reference_config``), else from the weights themselves, with
    the values weights do not store taken from the arguments or, with a warning, from the published config
    with this layout (``PUBLISHED``), else the 16->128 model's.
    """
    gen_path = Path(gen_path)
    state = torch_load(gen_path, "generator checkpoint")
    buffers = {k: state[k] for k in BUFFER_NAMES if k in state}
    weights = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    foreign = [k for k in state if k not in buffers and not k.startswith(PREFIX)]
    if "state_dict" in state and "hyper_parameters" in state:
        raise CheckpointError(
            f"{gen_path} is already an sr3-lightning checkpoint: use it as it is (--ckpt, model.init_from)."
        )
    if foreign or not weights:
        raise CheckpointError(
            f"{gen_path}: unexpected key {foreign[0] if foreign else '(no denoise_fn.* weights)'}; "
            "a reference *_gen.pth holds schedule buffers and denoise_fn.* weights. "
            "Is this an *_opt.pth or another model?"
        )
    if any(k.startswith("time_mlp.") for k in weights):
        raise CheckpointError(
            f"{gen_path}: these weights are {DDPM_MODULE}; only the reference's sr3 models load."
        )
    spec = None
    if config is None:
        config = find_reference_config(gen_path)
    if isinstance(config, str | Path):
        config, spec = read_reference_config(Path(config))
    given = {"norm_groups": norm_groups, "image_size": image_size, "dropout": dropout}
    given = {k: v for k, v in given.items() if v is not None}
    assumed, published = {}, None
    if config is None:
        published, defaults = unstored_defaults(weights)
        assumed = {k: v for k, v in defaults.items() if k not in given}
        config = infer_unet_config(weights, **{**defaults, **given})
    elif {"image_size", "dropout"} & set(given):
        raise CheckpointError(
            f"{gen_path}: --image-size and --dropout are for weights without a config JSON; the config "
            "sets them (and its attention resolutions go with its image size): leave them out"
        )
    else:
        config = replace(config, **given)
    _check_group_norm(config, gen_path)
    unet = UNet(config)
    check_shapes(unet, weights, gen_path)
    unet.load_state_dict(weights, strict=True)
    _warn_assumed(assumed, gen_path, published)
    if len(buffers) == len(BUFFER_NAMES):
        schedule, spec = _schedule_from_buffers(buffers, spec)
    else:
        spec = spec or dict(REFERENCE_SCHEDULE)
        schedule = make_schedule(**spec)
    opt_state, step, epoch = None, 0, 0
    if opt_path is not None:
        opt = torch_load(Path(opt_path), "optimizer checkpoint")
        if "optimizer" not in opt:
            raise CheckpointError(
                f"{opt_path}: no 'optimizer' entry; a reference *_opt.pth holds "
                "{'epoch', 'iter', 'scheduler', 'optimizer'}. Is this the *_gen.pth?"
            )
        opt_state, step, epoch = opt["optimizer"], int(opt.get("iter", 0)), int(opt.get("epoch", 0))
        _check_optimizer(opt_state, unet, Path(opt_path))
    return ReferenceCheckpoint(unet, schedule, opt_state, step, epoch, config, spec)


def _warn_assumed(assumed: dict, source: Path, published: str | None) -> None:
    if not assumed:
        return
    values = ", ".join(f"{k}={v}" for k, v in assumed.items())
    flags = " ".join(f"--{k.replace('_', '-')} VALUE" for k in assumed)
    if published:
        log.warning(
            "%s: no reference config JSON given or beside it; the weights have the layout of the reference's "
            "%s, so its values the weights do not store were taken: %s. If it was trained with other values, "
            "pass --config with the JSON it was trained with, or %s",
            source,
            published,
            values,
            flags,
        )
    else:
        log.warning(
            "%s: no reference config JSON given or beside it, and the weights do not store %s: assumed the "
            "16->128 model's values. The image size sets the size `sample` works at and the attention "
            "levels, dropout is used when fine-tuning, GroupNorm groups change every output. Pass --config "
            "with the JSON it was trained with, or %s",
            source,
            values,
            flags,
        )


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
