"""The one-step regression baseline trains through the same CLI and answers deterministically."""

from pathlib import Path

from PIL import Image

from sr3_lightning.cli import cli_main
from tests.loop import tiny_fit_args


def test_regression_trains_through_fit_and_samples_deterministically(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cli = cli_main(tiny_fit_args(tiny_shards, run, 3, "--model.objective=regression", "--model.loss=l2"))
    assert cli.model.hparams.objective == "regression" and cli.trainer.global_step == 3
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    Image.effect_noise((8, 8), 60).convert("RGB").save(lr_dir / "noise.png")
    outputs = []
    for seed in (0, 1):
        out = tmp_path / f"sr{seed}"
        cli_main(
            [
                "sample",
                "--ckpt",
                str(run / "checkpoints" / "last.ckpt"),
                "--input",
                str(lr_dir),
                "--out",
                str(out),
                f"--seed={seed}",
            ]
        )
        outputs.append((out / "noise_sr.png").read_bytes())
    assert outputs[0] == outputs[1]  # same input, same output, whatever the seed

    evaluation = [
        "--trainer.callbacks+=sr3_lightning.callbacks.DomainEval",
        "--trainer.callbacks.lpips=false",
    ]
    test = ["test", *tiny_fit_args(tiny_shards, run, 3, "--model.objective=regression", *evaluation)[1:]]
    cli = cli_main(test)  # no sampler: its measurements are named for the objective, not the sampler
    assert Path(cli.trainer.log_dir) == run / "test" / "regression"
    assert (run / "test" / "regression" / "eval" / "anime_step000003.csv").is_file()
