"""``demo``: the main job end to end on bundled data, on a CPU in a few minutes.

Builds three small domains from real photographs that ship inside scikit-image (cut into crops), or
from a folder you pass, shards them with ``dataset_tools.make_shards``, then runs
``fit --config configs/demo.yaml``: a tiny SR3 trained for 1200 steps with sample grids and
per-domain evaluation, W&B offline beside a CSV log.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import numpy as np
from jsonargparse import ArgumentParser
from PIL import Image

from sr3_lightning.commands import command_parser

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# Photographs shipped in scikit-image's wheel, grouped into a training domain and two evaluation domains.
DOMAINS = {
    "train/photos": ["coffee", "chelsea", "rocket", "astronaut", "stereo_motorcycle:0"],
    "val/photos": ["stereo_motorcycle:1"],
    "val/science": ["hubble_deep_field", "retina", "immunohistochemistry"],
}
CROPS = {"train/photos": 48, "val/photos": 8, "val/science": 3}  # crops per photo
CROP = 96  # px; make_shards then resizes to the model's 32 px HR / 8 px LR
DEFAULT_DATA_DIR = Path("demo_data")
MARKER = "demo_source.json"  # written into --data-dir: says the demo made its images/ and shards/ folders


def parser() -> ArgumentParser:
    p = command_parser("demo", __doc__)
    p.add_argument(
        "--src", type=Path | None, default=None, help="your own image folder (default: bundled photos)"
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where crops and shards go")
    p.add_argument("--config", type=Path, default=CONFIG, help="the fit config to run")
    return p


def write_crops(photo: np.ndarray, count: int, out: Path | None, stem: str, rng: np.random.Generator) -> None:
    """``count`` random crops of ``photo`` into ``out``; ``out=None`` only draws their positions."""
    h, w = photo.shape[:2]
    for i in range(count):
        y, x = rng.integers(0, h - CROP + 1), rng.integers(0, w - CROP + 1)
        if out is not None:
            Image.fromarray(photo[y : y + CROP, x : x + CROP]).save(out / f"{stem}_{i:03d}.png")


def bundled_photos(data_dir: Path, domains: tuple[str, ...] = tuple(DOMAINS)) -> dict[str, Path]:
    """Cut scikit-image's photographs into crops, one folder per domain in ``domains``; deterministic
    (seed 0). The crops of a domain do not depend on which domains are written (the others' positions are
    drawn all the same), so ``demo --src`` evaluates the very ``science`` crops of the bundled demo."""
    import skimage.data

    folders = {}
    rng = np.random.default_rng(0)
    for domain, names in DOMAINS.items():
        out = data_dir / "images" / domain if domain in domains else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            folders[domain] = out
        for entry in names:
            name, _, part = entry.partition(":")  # "stereo_motorcycle:1" = the right view of a pair
            photo = getattr(skimage.data, name)()
            photo = np.asarray(photo[int(part)] if part else photo)[..., :3]
            write_crops(photo, CROPS[domain], out, name + part, rng)
    return folders


def without_fresh(args: list[str]) -> list[str]:
    """The fit overrides ``test`` takes too: all but ``--fresh`` (fit's "start anew")."""
    kept, skip = [], False
    for arg in args:
        if not skip and not arg.startswith("--fresh"):
            kept.append(arg)
        skip = arg == "--fresh"  # `--fresh true`: its value is the next word
    return kept


def check_src(src: Path) -> list[Path]:
    """The user's images, all readable and with distinct names, checked before anything is written."""
    from sr3_lightning.images import check_output_names, check_readable, list_images

    files = list_images(src)
    check_output_names(files, ".png")
    check_readable(files)
    if len(files) < 16:
        raise ValueError(f"--src {src} has {len(files)} images; the demo needs at least 16 (8 train, 8 val).")
    return files


def user_photos(files: list[Path], data_dir: Path) -> dict[str, Path]:
    """Split the user's images: the last 8 (in name order) are held out for evaluation."""
    folders = {"train/photos": data_dir / "images/train/photos", "val/photos": data_dir / "images/val/photos"}
    for i, f in enumerate(files):
        dest = folders["val/photos" if i >= len(files) - 8 else "train/photos"]
        dest.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as img:
            img.convert("RGB").save(dest / f"{f.stem}.png")
    return folders


def made_from(marker: Path) -> str:
    """The source a marker records (for the log only: the demo rebuilds its folders on every run)."""
    try:
        return str(json.loads(marker.read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):  # no marker: an older demo made the folder
        return "an unknown source"


def reset_data_dir(data_dir: Path, source: str) -> None:
    """Empty the demo's own folders in ``data_dir`` so a run never mixes in crops of an earlier run.

    Only folders the demo writes are removed, and only when its marker says it made them; anything
    else in ``data_dir`` is left alone, and unmarked folders in the way are an error, not deleted.
    """
    marker = data_dir / MARKER
    ours = [data_dir / kind / domain for kind in ("images", "shards") for domain in DOMAINS]
    existing = [f for f in ours if f.is_dir() and any(f.iterdir())]
    # the default folder is the demo's own (`make clean` removes it), also when an older demo left no marker
    if existing and not marker.is_file() and data_dir != DEFAULT_DATA_DIR:
        raise ValueError(
            f"--data-dir {data_dir} already holds {existing[0]}, which this demo did not record making "
            f"(no {MARKER}), so it will not overwrite or mix with it. Pass a new --data-dir, or, if it is "
            f"left from an older demo run, delete {data_dir / 'images'} and {data_dir / 'shards'}."
        )
    if existing:
        log.info(
            "rebuilding demo data in %s (made from %s; now from %s)", data_dir, made_from(marker), source
        )
    for folder in existing:
        shutil.rmtree(folder)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"source": source}) + "\n")


def prepare_data(src: Path | None, data_dir: Path) -> None:
    """Crops of ``src`` (or of the bundled photos) cut into domains and sharded under ``data_dir/shards``."""
    from dataset_tools.make_shards import make_shards

    if src and src.resolve().is_relative_to(data_dir.resolve() / "images"):
        raise ValueError(
            f"--src {src} is inside the demo's own {data_dir / 'images'}; copy it elsewhere first."
        )
    files = check_src(src) if src else None
    reset_data_dir(data_dir, str(src.resolve()) if src else "bundled scikit-image photos")
    if files:  # your images are the new domain; the bundled "science" crops stay the original one
        folders = {**user_photos(files, data_dir), **bundled_photos(data_dir, ("val/science",))}
    else:
        folders = bundled_photos(data_dir)
    for name, folder in folders.items():
        split, domain = name.split("/")
        make_shards(
            folder, data_dir / "shards" / split / domain, domain, lr_size=8, hr_size=32, progress=False
        )


def main(argv: list[str]) -> None:
    from sr3_lightning.checkpoint_io import find_resume_checkpoint
    from sr3_lightning.cli import cli_main

    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser().parse_args(own)  # arguments after `--` go to fit, e.g. -- --trainer.max_steps=50
    prepare_data(args.src, args.data_dir)
    val = args.data_dir / "shards/val"
    fit_args = [
        "fit",
        "--config",
        str(args.config),
        f"--data.train.shards={args.data_dir / 'shards/train'}",
        f"--data.val=[{{domain: photos, shards: {val}}}, {{domain: science, shards: {val}}}]",
    ]
    cli = cli_main([*fit_args, *extra])
    run_dir = Path(cli.trainer.log_dir)
    test_args = ["test", *fit_args[1:3], fit_args[4], *without_fresh(extra)]  # the same config and data
    if not any(a.startswith("--trainer.default_root_dir") for a in extra):
        test_args.append(f"--trainer.default_root_dir={run_dir}")
    ckpt = find_resume_checkpoint(run_dir)  # also when the run was already complete and nothing ran
    lines = [
        "Demo finished.",
        f"  metrics CSV : {run_dir / 'metrics.csv'}",
        f"  sample grids: {run_dir / 'grids'}",
        f"  eval tables : {run_dir / 'eval'}",
        f"  checkpoint  : {ckpt}",
        f"  measure again: python -m sr3_lightning {shlex.join(test_args)}",
    ]
    if (run_dir / "wandb").is_dir():
        lines.append(
            f"  W&B offline : {run_dir / 'wandb'}  (upload: wandb sync {run_dir / 'wandb'}/offline-run-*)"
        )
    print("\n" + "\n".join(lines))
