"""W&B offline beside CSV: what a dashboard would show, read back from the run files."""

import csv
import time

import wandb
from wandb.proto import wandb_internal_pb2

from sr3_lightning.cli import cli_main
from sr3_lightning.tracking import resolve_mode
from sr3_lightning.wandb_offline import _records, read_history, run_files
from tests.loop import tiny_fit_args

EVAL = (
    "--trainer.callbacks+=sr3_lightning.callbacks.DomainEval",
    "--trainer.callbacks.every_n_steps=1",
    "--trainer.callbacks.sampler=ddim",
    "--trainer.callbacks.steps=3",
    "--trainer.callbacks.lpips=false",
)


def wait_for_exit_record(wandb_dir, timeout_s: float = 60.0) -> None:
    """W&B's service process writes the run file; on a loaded machine it may still be writing after finish."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in run_files(wandb_dir):
            kinds = [
                wandb_internal_pb2.Record.FromString(raw).WhichOneof("record_type")
                for raw in _records(path.read_bytes())
            ]
            if "exit" in kinds:
                return
        time.sleep(0.5)
    raise AssertionError(f"no exit record in the W&B run file under {wandb_dir} after {timeout_s} s")


def test_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"


def test_offline_run_history_and_csv_hold_domain_metrics_per_step(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cli_main(tiny_fit_args(tiny_shards, tmp_path, 3, "--tracking.mode=auto", *EVAL))
    wandb.finish()
    wait_for_exit_record(tmp_path / "wandb")
    history = read_history(tmp_path / "wandb")
    steps = {row["trainer/global_step"] for row in history if "val/anime/psnr" in row}
    assert steps >= {0, 1, 2, 3}, f"{len(history)} history rows, {steps=}"
    (run_file,) = run_files(tmp_path / "wandb")
    killed = tmp_path / "killed" / run_file.name  # a run killed while writing: every whole record still reads
    killed.parent.mkdir()
    killed.write_bytes(run_file.read_bytes()[: run_file.stat().st_size - 3])
    assert read_history(killed.parent) == history  # W&B's last records are not history rows
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/anime/psnr")]
    assert {int(r["step"]) for r in rows} == steps
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "train_keys.txt").read_text().count(
        "\n"
    ) == 24 - 2


def test_wandb_logging_failures_never_stop_training(tmp_path, monkeypatch, caplog):
    from sr3_lightning.tracking import SafeWandbLogger

    logger = SafeWandbLogger(project="p", save_dir=str(tmp_path), mode="offline")
    assert "anonymous" not in logger._wandb_init  # W&B warns on every start that the setting is gone
    broken = type("Run", (), {"log": lambda self, *a, **k: (_ for _ in ()).throw(ConnectionError("down"))})()
    monkeypatch.setattr(SafeWandbLogger, "experiment", property(lambda self: broken))
    logger.log_metrics({"train/loss": 1.0}, step=3)
    logger.log_metrics({"train/loss": 0.5}, step=4)
    assert caplog.text.count("W&B log_metrics failed (down); training continues") == 1


def test_wandb_run_id_is_kept_across_resumes_and_a_sweep_agent_id_wins(tmp_path, monkeypatch):
    from sr3_lightning.tracking import wandb_run_id

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = wandb_run_id(tmp_path)
    assert len(first) == 8 and wandb_run_id(tmp_path) == first
    monkeypatch.setenv("WANDB_RUN_ID", "sweep123")
    (tmp_path / "swept").mkdir()
    assert wandb_run_id(tmp_path / "swept") == "sweep123"
