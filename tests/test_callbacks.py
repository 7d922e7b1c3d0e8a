"""SampleGrid and DomainEval in real tiny fits: grids on disk, metrics in the CSV log, baseline on resume."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from dataset_tools.make_shards import make_shards
from sr3_lightning.callbacks import DomainEval, SampleGrid
from sr3_lightning.callbacks.val_batches import add_to_digest, regroup
from sr3_lightning.data import SR3DataModule, TrainDomain, ValDomain
from sr3_lightning.metrics import LpipsWeightsMissing, consistency, psnr, ssim, to_uint8
from sr3_lightning.module import SR3Module
from tests.conftest import write_images
from tests.loop import tiny_fit_args
from tests.reference import TINY as TINY_UNET

VAL_DOMAINS = ("anime", "ffhq")
NUM_VAL = 3  # images per val domain; batch size 2 so a domain takes two batches
FAST = dict(steps=4, seed=0)  # 4 respaced DDPM steps: sampling is not what these tests check


def make_module(objective: str = "diffusion") -> SR3Module:
    torch.manual_seed(0)
    return SR3Module(unet=TINY_UNET, num_timesteps=100, objective=objective)


def make_data(shards: Path) -> SR3DataModule:
    return SR3DataModule(
        train=TrainDomain("anime", str(shards)),
        val=[ValDomain(d, str(shards), num_images=NUM_VAL) for d in VAL_DOMAINS],
        batch_size=2,
        num_workers=0,
        lr_size=8,
        hr_size=32,
    )


def fit(
    root: Path,
    callbacks: list[Callback],
    shards: Path,
    module: LightningModule | None = None,
    max_steps: int = 3,
    ckpt_path: str | None = None,
    **trainer_args: Any,
) -> Trainer:
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(root),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # the module's own validation loop is not under test
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
        **trainer_args,
    )
    trainer.fit(module or make_module(), datamodule=make_data(shards), ckpt_path=ckpt_path)
    return trainer


def logged_metrics(trainer: Trainer) -> dict[int, dict[str, float]]:
    """step -> {key: value} from the CSVLogger's metrics.csv (empty cells dropped)."""
    rows: dict[int, dict[str, float]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v != ""})
    return rows


class ModeProbe(Callback):
    """Records train mode and grad mode at each training batch: the callbacks must hand both back."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.seen.append((pl_module.training, torch.is_grad_enabled()))


def test_grids_metrics_forgetting_and_tables(tmp_path: Path, tiny_shards: Path) -> None:
    grid = SampleGrid(every_n_steps=2, num_images=2, intermediates=3, **FAST)
    evaluation = DomainEval(
        every_n_steps=2, original_domains=["ffhq"], lpips_backbone="random", diversity_samples=2, **FAST
    )
    probe = ModeProbe()
    trainer = fit(tmp_path, [grid, evaluation, probe], tiny_shards)
    run = Path(trainer.log_dir)

    for d in VAL_DOMAINS:  # step 0 (before any update), every 2 steps, and the end (step 3)
        for step in (0, 2, 3):
            assert (run / "grids" / f"{d}_step{step:06d}.png").is_file()
            assert (run / "grids" / f"{d}_chain_step{step:06d}.png").is_file()
            assert (run / "grids" / f"diversity_{d}_step{step:06d}.png").is_file()
    assert sorted(p.name for p in (run / "grids").glob("anime_step*")) == [
        f"anime_step{s:06d}.png" for s in (0, 2, 3)
    ]
    assert probe.seen == [(True, True)] * 3

    logged = logged_metrics(trainer)
    psnr_steps = {s for s, m in logged.items() if "val/anime/psnr" in m and "val/ffhq/psnr" in m}
    assert psnr_steps == {0, 2, 3} == set(evaluation.history)
    keys = set().union(*logged.values())
    assert {k.split("/")[1] for k in keys if k.startswith("forget/")} == {"ffhq"}
    assert not any(k.endswith("/lpips") or k.endswith("bicubic_lpips") for k in keys)  # random != LPIPS
    assert "val/ffhq/lpips_random" in keys and "val/ffhq/bicubic_lpips_random" in keys
    for step in (0, 2, 3):
        for metric in ("psnr", "ssim", "lpips_random", "consistency", "diversity"):
            change = logged[step][f"val/ffhq/{metric}"] - logged[0][f"val/ffhq/{metric}"]
            assert logged[step][f"forget/ffhq/{metric}"] == pytest.approx(change, abs=1e-9)
    assert logged[3]["val/anime/psnr"] != logged[0]["val/anime/psnr"]  # the weights did change
    assert all(logged[s]["val/anime/diversity"] > 0 for s in psnr_steps)

    # The bicubic baseline is lr_up vs HR over the same val images, computed directly.
    for d, loader in zip(VAL_DOMAINS, make_data(tiny_shards).val_dataloader()):
        batches = list(loader)
        hr, lr, lr_up = (torch.cat([b[k] for b in batches]) for k in ("hr", "lr", "lr_up"))
        expected = {
            "psnr": psnr(to_uint8(lr_up), to_uint8(hr)).mean().item(),
            "ssim": ssim(to_uint8(lr_up), to_uint8(hr)).mean().item(),
            "consistency": consistency(lr_up, lr).mean().item(),
        }
        for metric, value in expected.items():
            for step in psnr_steps:
                assert logged[step][f"val/{d}/bicubic_{metric}"] == pytest.approx(value, rel=1e-9)

        with open(run / "eval" / f"{d}_step000003.csv") as f:
            table = list(csv.DictReader(f))
        assert [r["key"] for r in table] == [k for b in batches for k in b["key"]]
        assert len(table) == NUM_VAL
        assert list(table[0]) == ["key", "psnr", "ssim", "lpips_random", "consistency", "diversity"]
        mean_psnr = sum(float(r["psnr"]) for r in table) / NUM_VAL
        assert mean_psnr == pytest.approx(logged[3][f"val/{d}/psnr"], rel=1e-9)


def test_diversity_is_zero_for_regression_and_positive_for_diffusion(
    tmp_path: Path, tiny_shards: Path
) -> None:
    diversity = {}
    for objective in ("regression", "diffusion"):
        evaluation = DomainEval(lpips=False, at_end=False, diversity_samples=3, **FAST)
        fit(tmp_path / objective, [evaluation], tiny_shards, make_module(objective), max_steps=1)
        diversity[objective] = [evaluation.history[0][f"val/{d}/diversity"] for d in VAL_DOMAINS]
    assert diversity["regression"] == [0.0, 0.0]
    assert all(0.0 < v <= 0.5 for v in diversity["diffusion"])


def test_eval_numbers_do_not_depend_on_its_batch_size(tmp_path: Path, tiny_shards: Path) -> None:
    """All of a domain's images in one batch (the default: fewest network calls), or one at a time: each
    image draws its noise from the seed and its key, so every per-image number is the same."""
    tables = {}
    for batch_size in (None, 1):
        evaluation = DomainEval(lpips=False, at_end=False, batch_size=batch_size, **FAST)
        trainer = fit(tmp_path / str(batch_size), [evaluation], tiny_shards, make_module(), max_steps=1)
        with open(Path(trainer.log_dir) / "eval" / "ffhq_step000000.csv") as f:
            tables[batch_size] = list(csv.DictReader(f))
    assert len(tables[None]) == NUM_VAL and [r["key"] for r in tables[None]] == [r["key"] for r in tables[1]]
    for one, alone in zip(tables[None], tables[1]):
        assert float(one["psnr"]) == pytest.approx(float(alone["psnr"]), abs=0.02)  # uint8: within 1 level
        assert float(one["ssim"]) == pytest.approx(float(alone["ssim"]), abs=1e-3)


def test_regroup_cuts_loader_batches_into_eval_batches() -> None:
    loader = [
        {
            "lr": torch.full((2, 1), float(i)),
            "lr_up": torch.zeros(2, 1),
            "hr": torch.zeros(2, 1),
            "key": [f"{i}a", f"{i}b"],
        }
        for i in range(3)
    ]
    sizes = {size: [len(b["key"]) for b in regroup(loader, size)] for size in (None, 1, 4, 6, 10)}
    assert sizes == {None: [6], 1: [1] * 6, 4: [4, 2], 6: [6], 10: [6]}
    batches = list(regroup(loader, 4))
    assert batches[1]["key"] == ["2a", "2b"] and batches[1]["lr"].flatten().tolist() == [2.0, 2.0]
    assert batches[0]["lr"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    unnamed = [{k: v for k, v in b.items() if k != "key"} for b in loader]
    assert next(regroup(unnamed, None))["key"] == ["0", "1", "2", "3", "4", "5"]


def test_the_digest_of_val_images_does_not_depend_on_their_batches() -> None:
    def digest(loader: list[dict[str, Any]], size: int | None) -> str:
        h = hashlib.sha256()
        for batch in regroup(loader, size):
            add_to_digest(h, batch)
        return h.hexdigest()

    g = torch.Generator().manual_seed(0)
    loader = []
    for i in range(3):  # three loader batches of three images
        lr, hr = torch.rand(3, 3, 2, 2, generator=g), torch.rand(3, 3, 4, 4, generator=g)
        loader.append({"lr": lr, "lr_up": hr, "hr": hr, "key": [f"{i}{j}" for j in "abc"]})
    assert len({digest(loader, size) for size in (None, 1, 2, 4, 9)}) == 1  # DomainEval's batch_size
    before = digest(loader, None)
    loader[2]["hr"][1, 0, 0, 0] += 1e-3  # one pixel of one image
    changed = digest(loader, None)
    loader[2]["key"][1] = "renamed"
    assert len({before, changed, digest(loader, None)}) == 3


def test_resume_keeps_the_step0_baseline(
    tmp_path: Path, tiny_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def callbacks(run: str, at_steps: list[int]) -> tuple[DomainEval, ModelCheckpoint]:
        evaluation = DomainEval(at_steps=at_steps, original_domains=["ffhq"], lpips=False, **FAST)
        ckpt = ModelCheckpoint(dirpath=tmp_path / run / "ckpt", save_last=True, every_n_train_steps=2)
        return evaluation, ckpt

    first, ckpt = callbacks("a", [2, 4])
    fit(tmp_path / "a", [first, ckpt], tiny_shards, max_steps=2)
    assert set(first.history) == {0, 2}  # at_end at step 2 did not evaluate step 2 again

    last = tmp_path / "a" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)["callbacks"][first.state_key]
    restored = DomainEval(at_steps=[2, 4], original_domains=["ffhq"], lpips=False, **FAST)
    restored.load_state_dict(state)
    assert restored.state_dict() == first.state_dict()

    second, ckpt = callbacks("b", [2, 3, 4])  # more eval steps on resume: the baseline still comes back
    trainer = fit(tmp_path / "b", [second, ckpt], tiny_shards, max_steps=4, ckpt_path=str(last))
    assert second.baseline_step == 0 and second.baseline == first.baseline
    assert set(second.history) == {0, 2, 3, 4}  # no fresh "baseline" at the resumed step 2
    logged = logged_metrics(trainer)
    assert set(logged) == {3, 4}
    expected = logged[4]["val/ffhq/psnr"] - first.baseline["ffhq"]["psnr"]
    assert logged[4]["forget/ffhq/psnr"] == pytest.approx(expected, abs=1e-9)
    assert logged[4]["val/ffhq/bicubic_psnr"] == first.history[0]["val/ffhq/bicubic_psnr"]

    rebuilt = tmp_path / "rebuilt"  # ffhq's shards made anew from other images under the same names
    shutil.copytree(tiny_shards, rebuilt, ignore=shutil.ignore_patterns("ffhq"))
    write_images(tmp_path / "other_ffhq", 8, seed=1, prefix="ffhq_")
    make_shards(tmp_path / "other_ffhq", rebuilt / "ffhq", "ffhq", 8, 32, workers=1, progress=False)
    third, ckpt = callbacks("c", [3])
    with caplog.at_level(logging.WARNING):
        logged = logged_metrics(fit(tmp_path / "c", [third, ckpt], rebuilt, max_steps=3, ckpt_path=str(last)))
    assert "val/ffhq/psnr" in logged[3] and not any(k.startswith("forget/") for k in logged[3])
    assert "'ffhq' val images have the names but not the pixels of the baseline at step 0" in caplog.text


def test_missing_lpips_weights_stop_before_training(
    tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(LpipsWeightsMissing, match=r"alexnet-owt-7be5be79\.pth.*`lpips: false`"):
        DomainEval(lpips=True, **FAST).check_inputs()  # fit calls it before it makes the run directory
    domain_eval = "--trainer.callbacks+=sr3_lightning.callbacks.DomainEval"
    args = tiny_fit_args(tiny_shards, tmp_path / "run", 2, domain_eval)
    run = subprocess.run([sys.executable, "-m", "sr3_lightning", *args], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "error: LPIPS needs the AlexNet weights at" in run.stderr and not (tmp_path / "run").exists()


def test_val_loaders_without_datamodule(tmp_path: Path, tiny_shards: Path) -> None:
    data = make_data(tiny_shards)
    data.setup("fit")
    evaluation = DomainEval(lpips=False, at_end=False, **FAST)
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[evaluation],
    )  # fmt: skip
    trainer.fit(
        make_module(), train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader()
    )
    assert {k.split("/")[1] for k in evaluation.history[0]} == set(VAL_DOMAINS)  # named by their batches

    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[SampleGrid(**FAST)])
    with pytest.raises(RuntimeError, match="attach an SR3DataModule"):
        trainer.fit(make_module(), train_dataloaders=data.train_dataloader())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SampleGrid(every_n_steps=0), "every_n_steps=0"),
        (lambda: SampleGrid(steps=0), "steps=0"),
        (lambda: DomainEval(diversity_samples=1), "diversity_samples=1: use 0"),
        (lambda: DomainEval(at_steps=[-1]), "global steps start at 0"),
    ],
)
def test_bad_arguments_are_named(make: Callable[[], Callback], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_original_domain_is_named(tmp_path: Path, tiny_shards: Path) -> None:
    evaluation = DomainEval(original_domains=["celeba"], lpips=False, **FAST)
    with pytest.raises(ValueError, match=r"\['celeba'\] are not val domains; the val domains are \['anime'"):
        fit(tmp_path, [evaluation], tiny_shards, max_steps=1)


@pytest.mark.slow
def test_wandb_gets_grids_and_tables(
    tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B offline: grids as images, per-image tables and metrics arrive; PNG/CSV copies are still written."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=tmp_path, project="sr3-callbacks-test", offline=True)
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[SampleGrid(num_images=2, **FAST), DomainEval(lpips=False, diversity_samples=2, **FAST)],
    )  # fmt: skip
    trainer.fit(make_module(), datamodule=make_data(tiny_shards))
    run_dir = Path(logger.experiment.dir)
    summary_keys = set(logger.experiment.summary.keys())
    logger.experiment.finish()
    media = {p.relative_to(run_dir / "media").parts[0] for p in (run_dir / "media").rglob("*") if p.is_file()}
    assert media == {"images", "table"}
    assert {"samples/anime", "samples/ffhq", "eval/anime", "val/ffhq/psnr"} <= summary_keys
    assert (tmp_path / "grids" / "anime_step000001.png").is_file()
    assert (tmp_path / "eval" / "ffhq_step000001.csv").is_file()


def test_out_of_memory_while_evaluating_names_the_batch_size_knob() -> None:
    class TooBig:
        def super_resolve(self, *args: Any, **kwargs: Any) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    lr_up = torch.zeros(50, 3, 8, 8)
    with pytest.raises(torch.OutOfMemoryError, match=r"50 'celebahq' images at once.*batch_size=12"):
        DomainEval(lpips=False)._sample(TooBig(), lr_up, "celebahq", [str(i) for i in range(50)], seed=0)
