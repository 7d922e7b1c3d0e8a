"""`make demo`'s command on a user folder, shortened: shards, fit, grids, evaluation, checkpoint."""

import csv

import pytest

from sr3_lightning.cli import cli_main
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
