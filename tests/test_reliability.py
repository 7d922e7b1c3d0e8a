"""A run survives being killed at any moment, and bad situations stop it with a clear message."""

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sr3_lightning.checkpoint_io import AtomicCheckpointIO, find_resume_checkpoint
from sr3_lightning.cli import cli_main
from tests.loop import tiny_fit_args


def args_for(shards: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return tiny_fit_args(
        shards,
        run_dir,
        steps,
        "--trainer.val_check_interval=5",
        "--trainer.deterministic=true",
        "--trainer.callbacks.every_n_train_steps=5",
        *extra,
    )


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for (i, sa), sb in zip(
        a["optimizer_states"][0]["state"].items(), b["optimizer_states"][0]["state"].values()
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), i
    assert a["SR3DataModule"] == b["SR3DataModule"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bitwise_identical(tiny_shards, tmp_path):
    steps, ema = 20, "--model.ema_decay=0.9"  # the EMA weights must continue exactly too
    cli_main(args_for(tiny_shards, tmp_path / "straight", steps, ema))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sr3_lightning", *args_for(tiny_shards, killed, steps, ema)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step=10.ckpt").exists():  # ModelCheckpoint names it epoch=0-step=10
        if any((killed / "checkpoints").glob("*step=10.ckpt")) or time.time() > deadline:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = find_resume_checkpoint(killed)
    assert at_kill is not None and torch.load(at_kill, weights_only=False)["global_step"] < steps
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    straight = final_state(tmp_path / "straight")
    assert any(key.startswith("ema_unet.") for key in straight["state_dict"])
    assert_same_training_state(straight, final_state(killed))


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tiny_shards, tmp_path, caplog):
    cli_main(args_for(tiny_shards, tmp_path, 10))
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a crash mid-write without atomic saves would leave this
    found = find_resume_checkpoint(tmp_path)
    assert found is not None and found.name.endswith("step=10.ckpt")
    assert "last.ckpt is corrupt" in caplog.text
    cli = cli_main(args_for(tiny_shards, tmp_path, 15))
    assert cli.trainer.global_step == 15


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    good = target.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint files are untouched"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    assert target.read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("optimizer", ["torch.optim.SGD", "torch.optim.Adam"])  # host check / fused on device
def test_non_finite_steps_are_skipped_then_the_run_stops_naming_step_and_keys(
    tiny_shards, tmp_path, optimizer
):
    explode = [
        f"--model.optimizer={optimizer}",
        "--model.optimizer.lr=1e38",
        "--model.nonfinite_patience=3",
        "--trainer.log_every_n_steps=4",
    ]
    with pytest.raises(
        FloatingPointError, match=r"3 consecutive steps .* at step \d+ on batch keys \['anime_"
    ):
        cli_main(args_for(tiny_shards, tmp_path, 20, *explode))


def test_unwritable_run_directory_is_a_clear_error(tiny_shards, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(
        ValueError, match=r"run directory .*a_file/run is not writable .* --trainer.default_root_dir"
    ):
        cli_main(args_for(tiny_shards, blocker / "run", 2))


def test_fresh_moves_the_previous_run_aside(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cli_main(args_for(tiny_shards, run, 5))
    cli = cli_main([*args_for(tiny_shards, run, 5), "--fresh=true"])
    assert cli.trainer.global_step == 5
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "last.ckpt").is_file()


def test_best_by_metric_checkpoint_monitors_a_domain_eval_metric(tiny_shards, tmp_path):
    best = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.monitor=val/anime/psnr",
        "--trainer.callbacks.mode=max",
        "--trainer.callbacks.save_top_k=1",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.filename=best-{step}",
        "--trainer.callbacks+=sr3_lightning.callbacks.DomainEval",
        "--trainer.callbacks.every_n_steps=2",
        "--trainer.callbacks.sampler=ddim",
        "--trainer.callbacks.steps=2",
        "--trainer.callbacks.lpips=false",
    ]
    cli = cli_main(args_for(tiny_shards, tmp_path, 4, *best))
    monitor = [cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor == "val/anime/psnr"][0]
    assert Path(monitor.best_model_path).name.startswith("best-step=")
    assert float(monitor.best_model_score) > 0


def test_last_checkpoint_holds_the_final_step_and_resumes_exactly(tiny_shards, tmp_path):
    """A run that stops between periodic saves (here max_steps=7, saves every 5) must not lose steps 6-7."""
    cli = cli_main(args_for(tiny_shards, tmp_path / "stopped", 7))
    assert cli.trainer.global_step == 7 and final_state(tmp_path / "stopped")["global_step"] == 7
    cli_main(args_for(tiny_shards, tmp_path / "stopped", 12))
    cli_main(args_for(tiny_shards, tmp_path / "straight", 12))
    assert_same_training_state(final_state(tmp_path / "straight"), final_state(tmp_path / "stopped"))


def test_a_time_budget_saves_the_step_it_stopped_at(tiny_shards, tmp_path):
    cli = cli_main(args_for(tiny_shards, tmp_path, 100_000, "--trainer.max_time=00:00:00:04"))
    assert 0 < cli.trainer.global_step < 100_000
    assert final_state(tmp_path)["global_step"] == cli.trainer.global_step


def test_sigterm_saves_the_step_it_stopped_at_exits_143_and_resumes_exactly(tiny_shards, tmp_path):
    """A preempted job (or a sweep run stopped by its parent) must not pass for a finished one."""
    cli_main(args_for(tiny_shards, tmp_path / "straight", 12))
    stopped = args_for(tiny_shards, tmp_path / "stopped", 12)
    sigterm = "--trainer.callbacks+={class_path: tests.loop.SigtermAt, init_args: {step: 7}}"
    cut = subprocess.run(
        [sys.executable, "-m", "sr3_lightning", *stopped, sigterm], capture_output=True, text=True
    )
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[-2000:]
    assert "saved " in cut.stderr and "at the final step 7" in cut.stderr
    assert "stopped by SIGTERM (the log above says which step was saved); run the command again" in cut.stderr
    assert final_state(tmp_path / "stopped")["global_step"] == 7  # not the periodic save at 5
    assert cli_main(stopped).trainer.global_step == 12
    assert_same_training_state(final_state(tmp_path / "straight"), final_state(tmp_path / "stopped"))
    straight, resumed = ((tmp_path / d / "metrics.csv").read_text() for d in ("straight", "stopped"))
    assert resumed == straight  # every row once, at its step


def test_sigterm_inside_an_accumulation_window_keeps_the_last_save_and_resumes_exactly(
    tiny_shards, tmp_path, caplog
):
    """The summed gradients of a half-done window are not in a checkpoint: saving there would not resume
    exactly, so the run goes back to its last periodic save."""
    accumulate = "--trainer.accumulate_grad_batches=2"
    cli_main(args_for(tiny_shards, tmp_path / "straight", 8, accumulate))
    stopped = args_for(tiny_shards, tmp_path / "stopped", 8, accumulate)
    with pytest.raises(SIGTERMException):
        cli_main([*stopped, "--trainer.callbacks+={class_path: tests.loop.SigtermAt, init_args: {step: 7}}"])
    assert "SIGTERM at step 6: not saved (inside a gradient-accumulation window" in caplog.text
    assert final_state(tmp_path / "stopped")["global_step"] == 5
    assert cli_main(stopped).trainer.global_step == 8
    assert_same_training_state(final_state(tmp_path / "straight"), final_state(tmp_path / "stopped"))


def test_a_moved_run_directory_resumes_from_its_highest_step(tiny_shards, tmp_path):
    """Lightning writes last-v1.ckpt in a moved run directory; the old last.ckpt must not win by name."""
    cli_main(args_for(tiny_shards, tmp_path / "before", 5))
    (tmp_path / "before").rename(tmp_path / "after")
    cli_main(args_for(tiny_shards, tmp_path / "after", 7))
    found = find_resume_checkpoint(tmp_path / "after")
    assert torch.load(found, weights_only=False)["global_step"] == 7, sorted(found.parent.iterdir())
    assert cli_main(args_for(tiny_shards, tmp_path / "after", 9)).trainer.global_step == 9
    cli_main(args_for(tiny_shards, tmp_path / "straight", 9))
    last = max((tmp_path / "after" / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert_same_training_state(
        final_state(tmp_path / "straight"), torch.load(last, map_location="cpu", weights_only=False)
    )


def test_a_start_that_left_no_checkpoint_is_set_aside_not_appended_to(tiny_shards, tmp_path):
    cli_main(args_for(tiny_shards, tmp_path, 3))
    shutil.rmtree(tmp_path / "checkpoints")  # killed before its first save
    (tmp_path / "wandb_run_id.txt").write_text("abcd1234\n")
    cli_main(args_for(tiny_shards, tmp_path, 3))
    rows = csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines())
    steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert steps == [0, 1, 2]  # not 0, 1, 2, 0, 1, 2
    (aside,) = tmp_path.glob("metrics.*.csv")  # nothing lost: the earlier rows are kept beside
    assert "train/loss" in aside.read_text() and not (tmp_path / "wandb_run_id.txt").exists()
