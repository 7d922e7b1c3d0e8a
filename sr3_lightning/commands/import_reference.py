"""``import-reference``: turn a reference ``*_gen.pth`` (+ ``*_opt.pth``) into one of our checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

from jsonargparse import ArgumentParser

from sr3_lightning.checkpoints import CheckpointError, load_reference, write_checkpoint
from sr3_lightning.commands import command_parser

log = logging.getLogger(__name__)


def parser() -> ArgumentParser:
    p = command_parser("import-reference", __doc__)
    p.add_argument(
        "--gen", type=Path, required=True, help="reference generator file, e.g. I640000_E37_gen.pth"
    )
    p.add_argument("--opt", type=Path | None, default=None, help="reference optimizer file (*_opt.pth)")
    p.add_argument(
        "--config", type=Path | None, default=None, help="reference config JSON it was trained with"
    )
    p.add_argument(
        "--norm-groups",
        type=int | None,
        default=None,
        help="GroupNorm groups if no config (default: the published config with this layout, else 32)",
    )
    p.add_argument(
        "--image-size",
        type=int | None,
        default=None,
        help="HR size trained at, if no config (default: the published config with this layout, else 128)",
    )
    p.add_argument(
        "--dropout",
        type=float | None,
        default=None,
        help="UNet dropout if no config (default: the published config with this layout, else 0.2)",
    )
    p.add_argument("--out", type=Path, required=True, help="output checkpoint, e.g. ffhq_16_128.ckpt")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if args.out.is_dir():
        raise CheckpointError(
            f"--out {args.out} is a folder; name the checkpoint file, e.g. {args.out}/ffhq.ckpt"
        )
    unstored = {"norm_groups": args.norm_groups, "image_size": args.image_size, "dropout": args.dropout}
    ref = load_reference(args.gen, args.opt, config=args.config, **unstored)
    spec = ref.schedule_spec
    if spec["kind"] == "stored":
        raise CheckpointError(
            f"{args.gen}: its schedule buffers match no named schedule; pass the reference config JSON "
            "(--config) that names the schedule it was trained with."
        )
    hparams = {
        "unet": ref.config.to_dict(),
        "beta_schedule": spec["kind"],
        "num_timesteps": spec["num_timesteps"],
        "beta_start": spec["start"],
        "beta_end": spec["end"],
        "weight_init": "default",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(args.out, ref, hparams)
    n_params = sum(p.numel() for p in ref.unet.parameters())
    log.info(
        "wrote %s: UNet %s (%d parameters), schedule %s, reference iteration %d%s",
        args.out,
        ref.config.to_dict(),
        n_params,
        spec,
        ref.step,
        ", with its Adam state" if ref.optimizer_state else "",
    )
