"""`sample` and `upscale` refuse bad input up front, in one paragraph naming the file or flag and the fix."""

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from PIL import Image

from sr3_lightning.cli import cli_main
from sr3_lightning.commands import sample, upscale
from sr3_lightning.diffsr import diffsr
from sr3_lightning.module import SR3Module
from tests.reference import REF, TINY

FAST = ["--sampler", "ddim", "--steps", "2"]
COMMANDS = {"sample": [], "upscale": ["--scale", "2", "--noise-level", "0.3"]}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The reference's tiny conditional SR3 (32 px, T=100) as one of our checkpoints."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    cli_main(["import-reference", "--gen", str(REF / "tiny_gen.pth"), "--out", str(ckpt)])
    return ckpt


def run_command(command: str, ckpt: Path, inputs: Path, out: Path, *extra: str) -> None:
    argv = [command, "--ckpt", str(ckpt), "--input", str(inputs), "--out", str(out)]
    cli_main([*argv, *FAST, *COMMANDS[command], *extra])


def expect_error(capsys, command: str, ckpt: Path, inputs: Path, out: Path, *extra: str) -> str:
    """Run the command, check it stopped with a one-paragraph error and wrote nothing, return the error."""
    with pytest.raises(SystemExit) as exit_info:
        run_command(command, ckpt, inputs, out, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out.exists(), "the command wrote outputs before refusing its input"
    return err


def colour_images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (30 * i, 100, 200)).save(folder / name)
    return folder


@pytest.mark.parametrize("command", list(COMMANDS))
def test_inputs_whose_outputs_collide_are_refused_before_sampling(tiny_ckpt, tmp_path, capsys, command):
    inputs = colour_images(tmp_path / "in", "a.png", "a.jpg", "b.png")
    err = expect_error(capsys, command, tiny_ckpt, inputs, tmp_path / "out")
    suffix = "_sr.png" if command == "sample" else "_diffsr.png"
    assert str(inputs / "a.png") in err and str(inputs / "a.jpg") in err and f"a{suffix}" in err
    assert "rename one of them" in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_corrupt_input_image_is_named_before_the_model_runs(tiny_ckpt, tmp_path, capsys, command):
    inputs = colour_images(tmp_path / "in", "a.png", "c.png")
    (inputs / "b.png").write_bytes(os.urandom(300))
    Image.fromarray(np.full((8, 8), -3.0, np.float32)).save(inputs / "d.tif")  # no range to map to 8 bits
    err = expect_error(capsys, command, tiny_ckpt, inputs, tmp_path / "out")
    assert f"2 input image(s) could not be read: {inputs / 'b.png'}" in err
    assert f"{inputs / 'd.tif'} (ValueError: a 32-bit float image with values -3..-3" in err
    assert "replace or remove it" in err and str(inputs / "a.png") not in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_photo_is_super_resolved_upright_as_its_exif_asks(tiny_ckpt, tmp_path, caplog, command):
    """A phone photo stored landscape with 'rotate 90' in its EXIF comes out portrait, as viewers show it."""
    stored = np.zeros((10, 14, 3), np.uint8)
    stored[:, :7] = 255  # left half white as stored: the top half once turned upright (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "in").mkdir()
    Image.fromarray(stored).save(tmp_path / "in" / "photo.png", exif=exif)
    if command == "sample":  # its pixels are a random model's; what it crops is the upright photo's
        with caplog.at_level(logging.WARNING):
            run_command(command, tiny_ckpt, tmp_path / "in", tmp_path / "out")
        assert "not square; only their centre square is super-resolved: photo.png (10x14)" in caplog.text
        return
    run_command(command, tiny_ckpt, tmp_path / "in", tmp_path / "out", "--noise-level", "0")  # bicubic
    with Image.open(tmp_path / "out" / "photo_diffsr.png") as out:
        result = np.asarray(out.convert("L"), dtype=np.float64)
    assert result.shape == (28, 20)  # height x width: the upright 10x14 photo, doubled
    assert result[:12].mean() > 250 and result[16:].mean() < 5


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_garbage_checkpoint_is_named_not_a_torch_traceback(tiny_ckpt, tmp_path, capsys, command, damage):
    bad = tmp_path / "model.ckpt"
    good = tiny_ckpt.read_bytes()
    bad.write_bytes(os.urandom(4096) if damage == "random bytes" else good[: len(good) // 2])
    inputs = colour_images(tmp_path / "in", "a.png")
    err = expect_error(capsys, command, bad, inputs, tmp_path / "out")
    assert f"checkpoint {bad} is not a checkpoint sr3-lightning can read" in err and "truncated" in err
    assert "weights_only" not in err


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("sample", ["--batch-size", "0"], r"--batch-size 0: use a positive number"),
        ("sample", ["--batch-size", "-2"], r"--batch-size -2: use a positive number"),
        ("sample", ["--steps", "0"], r"--steps 0: use a positive number of steps"),
        ("sample", ["--lr-size", "0"], r"--lr-size 0: use a positive size"),
        ("sample", ["--eta", "-1"], r"--eta -1\.0: DDIM's eta must be >= 0"),
        ("upscale", ["--eta", "-0.5"], r"--eta -0\.5: DDIM's eta must be >= 0"),
        ("upscale", ["--tile-overlap", "-1"], r"--tile-overlap -1: use 0 or more px"),
    ],
)
def test_impossible_numbers_are_refused_up_front(tiny_ckpt, tmp_path, capsys, command, extra, message):
    inputs = colour_images(tmp_path / "in", "a.png")
    err = expect_error(capsys, command, tiny_ckpt, inputs, tmp_path / "out", *extra)
    assert re.search(message, err), err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_distinct_names_still_all_get_written(tiny_ckpt, tmp_path, command):
    inputs = colour_images(tmp_path / "in", "a.png", "a_b.jpg", "b.png")
    run_command(
        command, tiny_ckpt, inputs, tmp_path / "out", *(["--batch-size", "2"] * (command == "sample"))
    )
    suffix = "_sr.png" if command == "sample" else "_diffsr.png"
    written = {p.name for p in (tmp_path / "out").glob(f"*{suffix}")}
    assert written == {f"a{suffix}", f"a_b{suffix}", f"b{suffix}"}


def test_upscale_checks_the_target_size_against_every_input_first(tiny_ckpt, tmp_path, capsys):
    inputs = colour_images(tmp_path / "in", "a.png")
    Image.new("RGB", (40, 40)).save(inputs / "z_large.png")  # last in name order: after a.png's output
    argv = ["upscale", "--ckpt", str(tiny_ckpt), "--input", str(inputs), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        cli_main([*argv, *FAST, "--size", "32x32", "--noise-level", "0.3"])
    err = capsys.readouterr().err
    assert "z_large.png: --size 32x32 does not enlarge the 40x40 input" in err
    assert not (tmp_path / "out").exists()


def unconditional_ckpt(tmp_path: Path) -> Path:
    model = SR3Module(unet=dataclasses.replace(TINY, in_channel=3), num_timesteps=100)
    ckpt = tmp_path / "uncond.ckpt"
    state = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**state, "pytorch-lightning_version": lightning.__version__}, ckpt)
    return ckpt


@pytest.mark.parametrize("command", list(COMMANDS))
def test_what_the_model_cannot_run_is_refused_before_anything_is_written(
    tiny_ckpt, tmp_path, capsys, command
):
    inputs = colour_images(tmp_path / "in", "a.png")
    err = expect_error(capsys, command, tiny_ckpt, inputs, tmp_path / "out", "--steps", "101")
    assert "--steps 101: this model's chain has 100 steps; use 1..100" in err
    if not torch.cuda.is_available():
        err = expect_error(capsys, command, tiny_ckpt, inputs, tmp_path / "out", "--device", "cuda")
        assert "--device cuda: this machine has no CUDA device; use --device cpu" in err
    (tmp_path / "out").write_bytes(b"not a folder")
    with pytest.raises(SystemExit):
        run_command(command, tiny_ckpt, inputs, tmp_path / "out")
    assert f"--out {tmp_path / 'out'} is a file; name a folder" in capsys.readouterr().err
    assert (tmp_path / "out").read_bytes() == b"not a folder"


def test_sample_refuses_an_unconditional_model_and_points_to_upscale(tmp_path, capsys):
    inputs = colour_images(tmp_path / "in", "a.png")
    err = expect_error(capsys, "sample", unconditional_ckpt(tmp_path), inputs, tmp_path / "out")
    assert "holds an unconditional model (its UNet takes 3 channels, SR3 takes 6" in err
    assert "`upscale` (Diff-SR) runs it" in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_images_result_depends_on_the_seed_and_its_name_not_on_its_batch(tiny_ckpt, tmp_path, command):
    inputs = colour_images(tmp_path / "in", "a.png", "b.png", "c.png")
    noisy = ["--sampler", "ddpm"] + (
        ["--noise-level", "1"] if command == "upscale" else []
    )  # from pure noise
    batch = ["--batch-size", "3"] if command == "sample" else []
    run_command(command, tiny_ckpt, inputs, tmp_path / "all", *noisy, *batch)
    run_command(command, tiny_ckpt, inputs / "b.png", tmp_path / "alone", *noisy)
    run_command(command, tiny_ckpt, inputs / "b.png", tmp_path / "seed1", *noisy, "--seed", "1")
    suffix = "_sr.png" if command == "sample" else "_diffsr.png"
    result = {
        run: np.asarray(Image.open(tmp_path / run / f"b{suffix}"), dtype=int)
        for run in ("all", "alone", "seed1")
    }
    assert np.abs(result["all"] - result["alone"]).max() <= 1  # in a batch of 3 or alone: the same noise
    assert np.abs(result["alone"] - result["seed1"]).max() > 10


def test_upscale_json_keeps_the_records_of_earlier_runs_into_the_folder(
    tiny_ckpt, tmp_path, caplog, monkeypatch
):
    inputs, out = colour_images(tmp_path / "in", "a.png", "b.png"), tmp_path / "out"
    run_command("upscale", tiny_ckpt, inputs / "a.png", out)
    run_command("upscale", tiny_ckpt, inputs, out, "--seed", "3")  # a.png is made again
    run_command("upscale", tiny_ckpt, inputs / "b.png", out, "--seed", "4")
    images = json.loads((out / "upscale.json").read_text())["images"]
    assert [(Path(r["input"]).name, r["seed"]) for r in images] == [("a.png", 3), ("b.png", 4)]
    assert "keeping the records of 1 earlier images there" in caplog.text
    calls = []

    def stop_at_the_second(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return diffsr(*args, **kwargs)

    monkeypatch.setattr(upscale, "diffsr", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):  # stopped part-way: the images written keep their records
        run_command("upscale", tiny_ckpt, inputs, out, "--seed", "5")
    images = json.loads((out / "upscale.json").read_text())["images"]
    assert [(Path(r["input"]).name, r["seed"]) for r in images] == [("b.png", 4), ("a.png", 5)]  # b: not
    # made again before the stop, so its seed-4 image and record stay
    assert not (out / "upscale.json.part").exists()


def test_sample_warns_about_cropping_and_caps_its_sheet(tiny_ckpt, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sample, "SHEET_ROWS", 2)
    inputs = colour_images(tmp_path / "in", "a.png", "b.png")
    Image.new("RGB", (12, 8)).save(inputs / "wide.png")
    run_command("sample", tiny_ckpt, inputs, tmp_path / "out", "--sampler", "ddpm", "--eta", "0.5")
    assert "--eta 0.5 is DDIM's; --sampler ddpm does not use it" in caplog.text
    assert (
        "1 input(s) are not square; only their centre square is super-resolved: wide.png (12x8)"
        in caplog.text
    )
    assert (
        len(list((tmp_path / "out").glob("*_sr.png"))) == 3 and "(the sheet shows the first 2)" in caplog.text
    )
    assert Image.open(tmp_path / "out" / "sheet.png").height == 12 + 2 * (32 + 2) + 2  # title + 2 rows


@pytest.mark.parametrize(("command", "examples"), [("sweep", 4), ("report", 2)])
def test_help_keeps_one_example_command_per_line(command, examples, capsys):
    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    lines = capsys.readouterr().out.splitlines()
    shown = [line for line in lines if line.startswith("    python -m sr3_lightning ")]
    assert len(shown) == examples and all(line.count("python -m") == 1 for line in shown)


def test_command_flags_are_never_abbreviated(tmp_path, capsys):
    """``--batch`` is not taken for ``--batch-size``: a typo must not silently pick another flag."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sample", "--ckpt", "x.ckpt", "--input", "in", "--out", str(tmp_path), "--batch", "2"])
    assert exit_info.value.code == 2 and "--batch" in capsys.readouterr().err
