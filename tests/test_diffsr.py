"""Diff-SR: noise level <-> step, losses and PRF, seamless tiles, upscale and diffsr-calibrate."""

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from PIL import Image

from sr3_lightning.cli import cli_main
from sr3_lightning.diffsr import (
    TileGrid,
    bicubic_to,
    choose_level,
    diffsr,
    fidelity_loss,
    find_prf,
    level_to_step,
    signature_loss,
    step_to_level,
    target_size,
    tiled_denoiser,
)
from sr3_lightning.diffsr.noise_level import TABLE_FORMAT, load_prf_table
from sr3_lightning.diffsr.tiling import seam_profile
from sr3_lightning.diffusion import respace
from sr3_lightning.images import to_tensor
from sr3_lightning.module import SR3Module
from tests.reference import REF, TINY, tiny_schedule

FAST = ["--sampler", "ddim", "--steps", "4"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The reference's tiny conditional SR3 (32 px, T=100) as one of our checkpoints."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    cli_main(["import-reference", "--gen", str(REF / "tiny_gen.pth"), "--out", str(ckpt)])
    return ckpt


def smooth_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: gradients plus a few soft blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([x, y, 1 - x * y], axis=-1) * 160 + 40
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.1, 0.3)]
        img += 60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)[..., None] * rng.uniform(-1, 1, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------- noise level
def test_noise_level_maps_to_a_fraction_of_the_chain_and_the_nearest_respaced_step():
    sched = tiny_schedule()  # T = 100
    assert [level_to_step(v, sched, 100) for v in (0.0, 0.004, 0.2, 0.455, 1.0)] == [0, 0, 20, 46, 100]
    sub = respace(sched, 10)  # kept 1-based training steps 1, 12, 23, ..., 100
    assert level_to_step(0.2, sub, 100) == 3 and step_to_level(3, sub, 100) == pytest.approx(0.23)
    assert level_to_step(1.0, sub, 100) == 10 and level_to_step(0.0, sub, 100) == 0
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"noise level .* in \[0, 1\]"):
            level_to_step(bad, sched, 100)


def test_losses_move_the_way_the_trade_off_needs():
    texture = np.random.default_rng(0).normal(0, 30, (32, 32, 1))
    hr_img = Image.fromarray(np.clip(np.asarray(smooth_image(32, 32)) + texture, 0, 255).astype(np.uint8))
    lr_img = hr_img.resize((8, 8), Image.Resampling.BICUBIC)
    hr, lr, up = (to_tensor(i)[None] for i in (hr_img, lr_img, bicubic_to(lr_img, (32, 32))))
    assert fidelity_loss(hr, hr).item() == 0.0  # HR has all of its own detail
    assert fidelity_loss(up, hr).item() > 0.5  # the bicubic upsample lacks most of it
    noisy = (up + 0.5 * torch.randn(up.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert signature_loss(up, lr).item() < 10 < signature_loss(noisy, lr).item()


def test_prf_is_the_admissible_run_and_the_choice_minimises_the_trade_off():
    levels = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    fidelity = [0.9, 0.6, 0.4, 0.3, 0.25, 0.2]  # shrinks with t
    signature = [1.0, 10.0, 30.0, 60.0, 120.0, 400.0]  # grows with t
    prf = find_prf(levels, signature, fidelity, omega=0.004, tau_signature=70, tau_fidelity=0.5)
    assert prf.range == (0.4, 0.6) and prf.admissible == [False, False, True, True, False, False]
    assert prf.level == 0.4  # J = L_fid + 0.004 L_sig: 0.52 at 0.4, 0.54 at 0.6
    none = find_prf(levels, signature, fidelity, omega=0.004, tau_signature=5, tau_fidelity=0.5)
    assert none.range is None and none.level == 0.4  # no PRF: argmin of J over the grid (0.52)


def _table(*entries):
    return {"format": TABLE_FORMAT, "scales": [dict(zip(("scale", "level", "prf"), e)) for e in entries]}


def test_auto_interpolates_in_log_scale_and_says_when_there_is_no_prf():
    table = _table((2.0, 0.2, (0.1, 0.3)), (4.0, 0.4, (0.3, 0.5)), (8.0, 0.6, None))
    mid = choose_level(table, 2 * math.sqrt(2))  # halfway between 2 and 4 in log scale
    assert (
        mid.level == pytest.approx(0.3)
        and mid.prf == pytest.approx((0.2, 0.4))
        and "interpolated" in mid.note
    )
    assert choose_level(table, 4.0).level == 0.4 and "calibrated" in choose_level(table, 4.0).note
    six = choose_level(table, 6.0)
    assert six.prf is None and "no PRF" in six.note and 0.4 < six.level < 0.6
    eight = choose_level(table, 8.0)
    assert eight.prf is None and "no PRF" in eight.note and eight.level == 0.6
    assert choose_level(table, 1.5).level == 0.2 and "outside" in choose_level(table, 1.5).note


def test_auto_uses_the_scale_each_entry_was_calibrated_at_and_refuses_edited_tables(tmp_path):
    table = _table((2.7, 0.25, (0.2, 0.3)), (4.0, 0.4, None))
    table["scales"][0]["effective_scale"] = 32 / 12  # x2.7 of a 32 px model: 12 px LR
    assert "calibrated" in choose_level(table, 32 / 12).note
    assert "interpolated" in choose_level(table, 2.7).note
    path = tmp_path / "prf.json"
    for key, value, message in (
        ("prf", [0.1], "prf=[0.1]"),
        ("scale", "2", "scale='2'"),
        ("level", 1.5, "level=1.5"),
        ("effective_scale", None, "effective_scale=None"),
    ):
        path.write_text(json.dumps({**table, "scales": [{**table["scales"][0], key: value}]}))
        with pytest.raises(ValueError, match=re.escape(f"scales[0] has {message}")):
            load_prf_table(path)


# ------------------------------------------------------------------------------------------- tiles
def test_tile_grid_covers_with_overlap_and_merges_back_exactly():
    grid = TileGrid.plan(40, 70, tile=32, overlap=8)
    assert grid.ys == (0, 8) and grid.xs[0] == 0 and grid.xs[-1] == 70 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(grid.xs, grid.xs[1:]))
    x = torch.randn(2, 3, 40, 70)
    torch.testing.assert_close(grid.merge(grid.split(x)), x)


def test_blending_removes_the_seams_a_tile_edge_makes():
    """A network with zero padding (like the UNet's convolutions) is wrong near a tile's edge: tiles that only
    abut show it as seams; blended tiles do not. Deterministic, so the seam test can see seams."""
    image = to_tensor(smooth_image(80, 56))[None]
    zero_padded = lambda x, g: torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=True)  # noqa: E731
    for overlap, seams in ((16, False), (0, True)):
        grid = TileGrid.plan(56, 80, 32, overlap)
        out = tiled_denoiser(zero_padded, None, grid)(image, torch.ones(1))
        border, inside = seam_profile(out, grid)
        assert (border.max() > 2 * inside.max()) == seams, (overlap, border.max(), inside.max())


class ZeroPaddedOracle(torch.nn.Module):
    """Stands in for the SR3 UNet: the exact eps for x0 = a zero-padded blur of the condition, so a tile's
    x0 is right inside it and too dark near its edge, as a zero-padded network's is. Deterministic: what
    the tiles leave at their edges is all that differs between neighbouring pixels of a smooth image."""

    config = TINY

    def forward(self, x: torch.Tensor, sqrt_gamma: torch.Tensor) -> torch.Tensor:
        x0 = torch.nn.functional.avg_pool2d(x[:, :3], 5, 1, 2, count_include_pad=True)
        g = sqrt_gamma.view(-1, 1, 1, 1)
        return (x[:, 3:] - g * x0) / (1 - g**2).sqrt()


def test_tiles_leave_no_seams_end_to_end(tiny_ckpt):
    """diffsr over 3x3 tiles: the SR3 model's chain runs tile by tile; with a network that is wrong near a
    tile's edge, abutting tiles leave seams in the upscaled image and blended tiles leave none."""
    model = SR3Module.load_from_checkpoint(tiny_ckpt, map_location="cpu").eval()
    up = to_tensor(bicubic_to(smooth_image(20, 18), (60, 54)))[None]
    gen = torch.Generator().manual_seed(0)
    result = diffsr(model, up, 0.5, sampler="ddim", steps=5, overlap=12, generator=gen)
    assert result.images.shape == (1, 3, 54, 60) and result.tiling.startswith("3x3 tiles")
    assert result.nfe == 3 * TileGrid.plan(54, 60, 32, 12).count  # 3 respaced steps from level 0.5
    model.unet, model.ema_unet = ZeroPaddedOracle(), None
    for overlap, seams in ((12, False), (0, True)):
        out = diffsr(model, up, 0.5, steps=10, overlap=overlap, generator=gen).images
        border, inside = seam_profile(out, TileGrid.plan(54, 60, 32, overlap))
        assert (border.max() > 2 * inside.max()) == seams, (overlap, border.max(), inside.max())


# ---------------------------------------------------------------------------------------- commands
def test_upscale_non_integer_scale_size_and_level_zero(tiny_ckpt, tmp_path, caplog):
    src = tmp_path / "in"
    src.mkdir()
    smooth_image(13, 11, seed=1).save(src / "a.png")
    smooth_image(16, 12, seed=2).save(src / "b.png")
    out = tmp_path / "out"
    base = ["upscale", "--ckpt", str(tiny_ckpt), "--input", str(src), *FAST]
    cli_main([*base, "--out", str(out), "--scale", "2.7", "--noise-level", "0.3"])
    assert Image.open(out / "a_diffsr.png").size == (35, 30) and Image.open(out / "b_diffsr.png").size == (
        43,
        32,
    )
    record = json.loads((out / "upscale.json").read_text())["images"][0]
    assert record["t_start"] == 2  # 0.3 T = 30 -> nearest of the kept steps 1, 34, 67, 100: 34, the 2nd
    assert record["noise_level_used"] == 0.34 and record["scale"] == 30 / 11  # 13x11 -> 35x30
    assert record["tiling"].startswith("2x1 tiles") and record["nfe"] == 2 * 2  # 35x30: padded to 35x32
    cli_main([*base, "--out", str(tmp_path / "zero"), "--size", "40x24", "--noise-level", "0"])
    for name in ("a", "b"):
        got = np.asarray(Image.open(tmp_path / "zero" / f"{name}_diffsr.png"))
        assert np.array_equal(got, np.asarray(bicubic_to(Image.open(src / f"{name}.png"), (40, 24))))
    cli_main([*base, "--out", str(tmp_path / "far"), "--size", "40x24", "--noise-level", "0.15"])
    assert "no step near noise level 0.150, so it started at level 0.010" in caplog.text  # kept: 1, 34, ...


def test_unconditional_checkpoint_runs_without_conditioning(tmp_path):
    import lightning

    model = SR3Module(unet=dataclasses.replace(TINY, in_channel=3), num_timesteps=100)
    ckpt = tmp_path / "uncond.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        ckpt,
    )
    smooth_image(10, 10).save(tmp_path / "x.png")
    argv = ["upscale", "--ckpt", str(ckpt), "--input", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]
    cli_main([*argv, "--scale", "3.5", "--noise-level", "0.5", *FAST])
    summary = json.loads((tmp_path / "o" / "upscale.json").read_text())
    assert summary["model"] == "unconditional" and Image.open(tmp_path / "o" / "x_diffsr.png").size == (
        35,
        35,
    )


def test_calibration_writes_a_prf_table_and_plots_that_auto_uses(
    tiny_ckpt, make_domain_shards, tmp_path, caplog
):
    shards = make_domain_shards("photos", 3)
    table_path = tmp_path / "prf.json"
    cli_main(
        [
            "diffsr-calibrate",
            "--ckpt",
            str(tiny_ckpt),
            "--data",
            str(shards),
            "--scales",
            "2,4",
            "--limit",
            "2",
        ]
        + ["--levels", "0,0.5,1", "--lpips", "false", "--out", str(table_path), *FAST]
    )
    table = json.loads(table_path.read_text())
    assert [e["scale"] for e in table["scales"]] == [2.0, 4.0] and table["lpips"].startswith("off")
    schedule = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-6, "beta_end": 1e-2}
    assert table["schedule"] == schedule
    one_by_one = tmp_path / "prf_batch1.json"
    cli_main(
        ["diffsr-calibrate", "--ckpt", str(tiny_ckpt), "--data", str(shards), "--scales", "2,4"]
        + ["--limit", "2", "--levels", "0,0.5,1", "--lpips", "false", "--out", str(one_by_one)]
        + ["--batch-size", "1", *FAST]
    )
    for alone, batched in zip(json.loads(one_by_one.read_text())["scales"], table["scales"]):
        for key in ("signature", "fidelity", "psnr", "ssim"):  # each image's noise is its own
            assert alone[key] == pytest.approx(batched[key], rel=1e-5, abs=1e-4), key
    for entry in table["scales"]:
        assert entry["levels"] == [0.0, 0.5, 1.0] and len(entry["signature"]) == len(entry["fidelity"]) == 3
        assert entry["level"] in entry["levels"] and entry["lpips"] is None
        assert entry["signature"][0] < entry["signature"][-1]  # noise replaces content
        assert (tmp_path / "prf_plots" / f"prf_x{entry['scale']:g}.png").is_file()
    smooth_image(12, 12).save(tmp_path / "x.png")
    out = tmp_path / "auto"
    cli_main(
        ["upscale", "--ckpt", str(tiny_ckpt), "--input", str(tmp_path / "x.png"), "--out", str(out)]
        + ["--scale", "3", "--noise-level", "auto", "--prf", str(table_path), *FAST]
    )
    record = json.loads((out / "upscale.json").read_text())["images"][0]
    assert record["noise_level"] == pytest.approx(choose_level(table, 3.0).level)
    assert "interpolated between x2 and x4" in record["level_note"]
    assert Image.open(out / "x_diffsr.png").size == (36, 36)
    table_path.write_text(json.dumps({**table, "schedule": {**table["schedule"], "num_timesteps": 2000}}))
    with caplog.at_level(logging.WARNING):
        cli_main(
            ["upscale", "--ckpt", str(tiny_ckpt), "--input", str(tmp_path / "x.png"), "--out", str(out)]
            + ["--scale", "3", "--noise-level", "auto", "--prf", str(table_path), *FAST]
        )
    assert "'num_timesteps': 2000" in caplog.text and "run diffsr-calibrate on this model" in caplog.text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scale", "1"], r"scale 1\.0.*factor > 1"),
        (["--scale", "-2.5"], r"factor > 1"),
        (["--size", "0x10"], r"WIDTHxHEIGHT"),
        (["--size", "big"], r"WIDTHxHEIGHT"),
        (["--size", "8x8"], r"does not enlarge the 12x12 input"),
        (["--scale", "2", "--size", "40x40"], r"exactly one of --scale"),
        ([], r"exactly one of --scale"),
        (["--scale", "2", "--noise-level", "1.5"], r"noise level 1\.5.*\[0, 1\]"),
        (["--scale", "2", "--noise-level", "lots"], r"'auto' or a number in \[0, 1\]"),
        (["--scale", "2", "--noise-level", "auto"], r"auto needs a PRF table"),
        (["--scale", "2", "--noise-level", "auto", "--prf", "missing.json"], r"does not exist"),
    ],
)
def test_invalid_scale_size_or_noise_level_is_a_clear_error(tiny_ckpt, tmp_path, capsys, extra, message):
    smooth_image(12, 12).save(tmp_path / "x.png")
    argv = [
        "upscale",
        "--ckpt",
        str(tiny_ckpt),
        "--input",
        str(tmp_path / "x.png"),
        "--out",
        str(tmp_path / "o"),
    ]
    argv += ["--noise-level", "0.2"] if "--noise-level" not in extra else []
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_calibrate_rejects_bad_flags_before_loading_anything(tmp_path, capsys):
    """Checked before the model (here: a missing file) is read, so a typo costs no sweep."""
    base = ["diffsr-calibrate", "--ckpt", str(tmp_path / "none.ckpt"), "--data", str(tmp_path)]
    (tmp_path / "tables").mkdir()
    for extra, message in (
        (["--scales", "2,0.5"], "factor > 1"),
        (["--levels", "0,2"], r"noise level 2\.0"),
        (["--steps", "0"], r"--steps 0: use a positive number"),
        (["--eta", "-1"], r"--eta -1\.0: DDIM's eta must be >= 0"),
        ([], r"--out \S*tables is a folder; name the table's file, e.g. \S*tables/prf\.json"),
    ):
        out = tmp_path / ("tables" if not extra else "x.json")
        with pytest.raises(SystemExit):
            cli_main([*base, "--out", str(out), *extra])
        assert re.search(message, capsys.readouterr().err)


def test_diffsr_commands_name_a_regression_checkpoint_and_the_fix(make_domain_shards, tmp_path, capsys):
    model = SR3Module(unet=TINY, num_timesteps=100, objective="regression")
    ckpt = tmp_path / "regression.ckpt"
    state = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**state, "pytorch-lightning_version": lightning.__version__}, ckpt)
    code, err = calibrate_error(capsys, ckpt, make_domain_shards("photos", 2), tmp_path / "x.json")
    assert code == 2 and f"--ckpt {ckpt}: this checkpoint is the one-step regression baseline" in err
    assert "model.objective diffusion" in err and not (tmp_path / "x.json").exists()


def calibrate_error(capsys, ckpt: Path, data: Path, out: Path) -> tuple[int, str]:
    """Run diffsr-calibrate expecting it to refuse: (exit code, stderr)."""
    argv = ["diffsr-calibrate", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--lpips", "false", *FAST])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_calibrate_on_a_corrupt_shard_names_its_own_fix(
    tiny_ckpt, make_domain_shards, tmp_path, capsys, damage
):
    """The shard check's fix must be one this command has: it has no on_corrupt option."""
    shards = make_domain_shards("photos", 3)
    shard = shards / "photos-000000.tar"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    code, err = calibrate_error(capsys, tiny_ckpt, shards, tmp_path / "x.json")
    assert code == 2 and "photos-000000.tar" in err, err
    assert "re-run make_shards for domain 'photos'" in err and "drop the domain from --domains" in err, err
    assert "on_corrupt" not in err, err


def test_calibrate_refuses_hr_images_smaller_than_the_model(tiny_ckpt, make_domain_shards, tmp_path, capsys):
    shards = make_domain_shards("thumbs", 2, lr=4, hr=16).parent  # the tiny model works at 32 px
    code, err = calibrate_error(capsys, tiny_ckpt, shards, tmp_path / "x.json")
    assert code == 2 and "the HR images of thumbs (16 px) are smaller than the model's 32 px" in err
    assert "make_shards --hr 32" in err and not (tmp_path / "x.json").exists()


def test_target_size_rounds_each_side():
    assert target_size((13, 11), scale=2.7) == ((35, 30), 30 / 11)  # the scale the pixels really have
    assert target_size((1, 1), scale=2.5) == ((2, 2), 2.0)
    with pytest.raises(ValueError, match=r"--scale 1.01 \(to 13x12\) does not enlarge the 13x12 input"):
        target_size((13, 12), scale=1.01)
    with pytest.raises(ValueError, match="factor > 1"):
        target_size((13, 11), scale=math.nan)
    assert target_size((10, 20), size=(40, 40)) == ((40, 40), 4.0)
