"""Two processes on CPU (gloo): data split without duplication, rank 0 alone writes, exact resume."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def fit(
    shards: Path, run_dir: Path, steps: int, devices: int, batch: int, *extra: str, command: str = "fit"
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "sr3_lightning",
        command,
        "--config",
        "configs/tiny_cpu.yaml",
        f"--data.train.shards={shards}",
        f"--trainer.default_root_dir={run_dir}",
        "--data.val=[{domain: anime, shards: " + str(shards) + ", num_images: 4}]",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2",
        f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        f"--data.batch_size={batch}",
        "--model.optimizer=torch.optim.Adam",
        "--model.optimizer.lr=1e-3",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_two_process_ddp_fit_resumes_exactly_and_matches_single_process(tiny_shards, tmp_path):
    fit(tiny_shards, tmp_path / "ddp", 4, devices=2, batch=2)
    straight = last(tmp_path / "ddp")
    # only rank 0 writes: one checkpoint per save step, one metrics file, no per-rank directories
    names = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert len(list((tmp_path / "ddp").rglob("metrics.csv"))) == 1
    # 2 ranks x 2 samples per step, each image once per pass: the stream advanced by the global batch
    assert straight["SR3DataModule"]["samples_seen"] == 4 * 4

    fit(tiny_shards, tmp_path / "split", 2, devices=2, batch=2)
    fit(tiny_shards, tmp_path / "split", 4, devices=2, batch=2)  # resumes from its step-2 checkpoint
    resumed = last(tmp_path / "split")
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key

    # the same global batch (4) in one process: different draws, so agreement within a tolerance. After
    # 4 Adam steps at lr 1e-3 the validation loss of both runs moved the same way, within 5 %.
    fit(tiny_shards, tmp_path / "single", 4, devices=1, batch=4)
    assert last(tmp_path / "single")["global_step"] == straight["global_step"] == 4

    def val_loss(run: str) -> float:
        rows = (tmp_path / run / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        col = header.index("val/anime/loss")
        return [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]][-1]

    assert abs(val_loss("ddp") - val_loss("single")) / val_loss("single") < 0.05

    # `test` under DDP: rank 0 measures every val image with its own noise, as one process does
    evaluation = [
        "--trainer.callbacks+=sr3_lightning.callbacks.DomainEval",
        "--trainer.callbacks.lpips=false",
        "--trainer.callbacks.steps=4",
    ]
    psnr = {}
    for devices in (2, 1):
        fit(tiny_shards, tmp_path / "ddp", 4, devices, 2, *evaluation, command="test")
        rows = (tmp_path / "ddp" / "test" / "ddpm-4-seed0" / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("val/anime/psnr")
        psnr[devices] = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert len(psnr[1]) == 1 and psnr[2] == [pytest.approx(psnr[1][0], abs=1e-4)]  # replaced, equal
