"""`make demo`'s command on a user folder, shortened: shards, fit, grids, evaluation, checkpoint."""

import csv
import json
import shlex
from pathlib import Path

import pytest

from sr3_lightning.cli import cli_main
from sr3_lightning.commands.demo import MARKER, reset_data_dir
from tests.conftest import write_images


@pytest.mark.slow
def test_demo_on_a_user_folder(tmp_path, capsys):
    write_images(tmp_path / "mine", 16, prefix="photo_")
    run = tmp_path / "run"
    cli_main(
        [
            "demo",
            "--src",
            str(tmp_path / "mine"),
            "--data-dir",
            str(tmp_path / "data"),
            "--",
            f"--trainer.default_root_dir={run}",
            "--trainer.max_steps=2",
            "--tracking.mode=disabled",
            "--fresh=true",
        ]
    )
    out = capsys.readouterr().out
    assert "Demo finished." in out and str(run / "metrics.csv") in out
    rows = [
        r for r in csv.DictReader((run / "metrics.csv").read_text().splitlines()) if r.get("val/photos/psnr")
    ]
    assert {int(r["step"]) for r in rows} == {0, 2} and rows[-1]["forget/science/psnr"]
    assert (run / "grids" / "photos_step000002.png").is_file() and (
        run / "checkpoints" / "last.ckpt"
    ).is_file()
    again = next(line for line in out.splitlines() if line.startswith("  measure again: "))
    assert "--tracking.mode=disabled" in again and "--fresh" not in again  # fit's "start anew" is not test's
    cli_main(shlex.split(again.split(" -m sr3_lightning ", 1)[1]))  # as printed, in the shell's words
    tested_csv = run / "test" / "ddpm-25-seed0" / "metrics.csv"  # the demo's DomainEval: respaced DDPM-25
    tested = [r for r in csv.DictReader(tested_csv.open()) if r.get("val/photos/psnr")]
    assert [(r["step"], r["val/photos/psnr"]) for r in tested] == [("2", rows[-1]["val/photos/psnr"])]


class FitStarted(Exception):
    """Raised by the stand-in for `fit`: these tests check the data the demo hands to it."""


@pytest.fixture
def demo_without_fit(monkeypatch):
    """Run `demo` through cli_main up to `fit`, with few bundled crops; returns the data-dir's shard keys."""
    import sr3_lightning.cli
    from sr3_lightning.commands import demo

    def fit(args):
        raise FitStarted(args)

    monkeypatch.setattr(sr3_lightning.cli, "cli_main", fit)
    monkeypatch.setattr(demo, "CROPS", {"train/photos": 2, "val/photos": 2, "val/science": 1})

    def run(data_dir, *src):
        with pytest.raises(FitStarted):
            cli_main(["demo", "--data-dir", str(data_dir), *(["--src", str(src[0])] if src else [])])
        keys = {}
        for index in (data_dir / "shards").glob("*/*/index.json"):
            name = f"{index.parent.parent.name}/{index.parent.name}"
            keys[name] = sorted(k for shard in json.loads(index.read_text())["shards"] for k in shard["keys"])
        return keys

    return run


def test_demo_on_a_new_src_rebuilds_the_data_of_an_earlier_run(demo_without_fit, tmp_path):
    data = tmp_path / "data"
    bundled = demo_without_fit(data)  # what `make demo` leaves behind
    assert [len(bundled[d]) for d in ("train/photos", "val/photos", "val/science")] == [10, 2, 3]
    science = data / "images" / "val" / "science"
    crops = {p.name: p.read_bytes() for p in science.iterdir()}
    write_images(tmp_path / "mine", 16, prefix="photo_")
    keys = demo_without_fit(data, tmp_path / "mine")
    assert {p.name: p.read_bytes() for p in science.iterdir()} == crops  # the very pixels, not just names
    assert keys["train/photos"] == [f"photo_{i:03d}" for i in range(8)]
    assert keys["val/photos"] == [f"photo_{i:03d}" for i in range(8, 16)]  # the user's photos are scored
    assert keys["val/science"] == bundled["val/science"]
    assert sorted(p.name for p in (data / "images/train/photos").iterdir()) == [
        f"photo_{i:03d}.png" for i in range(8)
    ]
    assert demo_without_fit(data) == bundled  # and back to the bundled photos


def test_demo_names_a_corrupt_file_in_src_before_writing_anything(demo_without_fit, tmp_path, capsys):
    write_images(tmp_path / "mine", 16, prefix="photo_")
    (tmp_path / "mine" / "photo_007.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--src", str(tmp_path / "mine"), "--data-dir", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"1 input image(s) could not be read: {tmp_path / 'mine' / 'photo_007.png'}" in err
    assert not (tmp_path / "data").exists()


def test_demo_leaves_data_it_did_not_make_alone(demo_without_fit, tmp_path, capsys):
    mine = write_images(tmp_path / "data" / "images" / "train" / "photos", 1, prefix="keep_")[0]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--data-dir", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "did not record making" in err and "Pass a new --data-dir" in err
    assert mine.is_file() and sorted(p.name for p in mine.parent.iterdir()) == [mine.name]


def test_default_data_dir_of_an_older_demo_is_rebuilt(monkeypatch, tmp_path):
    """demo_data/ is the demo's own folder: one an older demo left without its marker is rebuilt."""
    monkeypatch.chdir(tmp_path)
    old = write_images(Path("demo_data") / "images" / "train" / "photos", 1, prefix="old_")[0]
    reset_data_dir(Path("demo_data"), "bundled scikit-image photos")
    assert not old.exists() and (Path("demo_data") / MARKER).is_file()
