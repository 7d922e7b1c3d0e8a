"""The CLI driven as users drive it: fit, resume, validate, test, sample, import-reference, init_from."""

import csv
import subprocess
import sys
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
import yaml

from sr3_lightning.callbacks import DomainEval
from sr3_lightning.cli import bad_input_exits, cli_main
from sr3_lightning.diffusion.schedule import make_betas
from sr3_lightning.metrics import LpipsWeightsMissing
from sr3_lightning.module import SR3Module
from sr3_lightning.resume import changed_settings
from tests.reference import REF

CONFIG = "configs/tiny_cpu.yaml"


def fit_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        CONFIG,
        f"--data.train.shards={shards}",
        f"--trainer.default_root_dir={run_dir}",
        "--data.val=[{domain: anime, shards: " + str(shards) + ", num_images: 4}]",
        *extra,
    ]


def test_fit_l2_timestep_range_then_resume_to_twice_the_steps(tiny_shards, tmp_path, caplog):
    args = fit_args(
        tiny_shards,
        tmp_path,
        "--model.loss=l2",
        "--model.t_min=1",
        "--model.t_max=50",
        "--trainer.max_steps=2",
    )
    cli = cli_main(args)
    assert cli.model.hparams.loss == "l2" and cli.model.t_max == 50
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    position = torch.load(last, weights_only=False)["SR3DataModule"]
    cli_main([*args[:-1], "--trainer.max_steps=2"])  # resumes on its own, at max_steps already: says so
    assert "already at step 2 and trainer.max_steps is 2: nothing left to train" in caplog.text
    cli = cli_main(
        [*args[:-1], "--trainer.max_steps=4", f"--ckpt_path={last}", "--trainer.enable_progress_bar=true"]
    )
    assert cli.trainer.global_step == 4
    bar = cli.trainer.progress_bar_callback.train_progress_bar
    assert (bar.initial, bar.n, bar.total) == (2, 4, 4)  # the run's steps, not "2/?" after a resume
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 4 and resumed["SR3DataModule"] != position
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [0, 1, 2, 3]  # earlier rows kept, none twice
    assert [int(r["step"]) for r in rows if r["val/anime/loss"]] == [
        2,
        4,
    ]  # the weights' step, as checkpoints


def test_validate_reports_a_loss_per_domain_of_given_weights_only(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_lpips_weights"))  # DomainEval does not run here
    args = [
        "validate",
        "--config",
        CONFIG,
        f"--trainer.default_root_dir={tmp_path}",
        "--data.val=[{domain: anime, shards: " + str(tiny_shards) + "}, {domain: ffhq, shards: "
        f"{tiny_shards}" + "}]",
        "--trainer.callbacks+=sr3_lightning.callbacks.DomainEval",
    ]
    with pytest.raises(
        ValueError, match="validate has no weights to evaluate: .* model.init_from is not set"
    ):
        cli_main(args)  # an untrained model's losses would pass for a result
    cli = cli_main([*args, f"--model.init_from={REF / 'tiny'}"])  # e.g. the pretrained model before tuning
    metrics = cli.trainer.callback_metrics
    assert {"val/anime/loss", "val/ffhq/loss"} <= set(metrics)


def test_print_config_is_complete_and_reruns(tiny_shards, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main([*fit_args(tiny_shards, tmp_path), "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["unet"]["inner_channel"] == 8
    assert "hr_size" not in config["data"]  # linked from model.unet.image_size: written once
    (tmp_path / "printed.yaml").write_text(printed)
    cli = cli_main(["fit", "--config", str(tmp_path / "printed.yaml"), "--trainer.max_steps=1"])
    assert cli.trainer.global_step == 1


def config_stacks() -> list[list[str]]:
    """Each plain config alone, and each sweep's --config stack as its command line runs it."""
    plain = [[str(p)] for p in sorted(Path("configs").glob("*.yaml")) if not p.name.startswith("sweep_")]
    stacks = []
    for sweep in sorted(Path("sweeps").glob("*.yaml")):
        command = yaml.safe_load(sweep.read_text())["command"]
        stacks.append([command[i + 1] for i, arg in enumerate(command) if arg == "--config"])
    overlays = {c for stack in stacks for c in stack if Path(c).name.startswith("sweep_")}
    assert overlays == {str(p) for p in Path("configs").glob("sweep_*.yaml")}  # every overlay is used
    return plain + stacks


def holds(printed: object, written: object) -> bool:
    """Every value written in a config is in the printed one (dicts: the keys written; lists: each item)."""
    if isinstance(written, dict):
        return isinstance(printed, dict) and all(
            k in printed and holds(printed[k], v) for k, v in written.items()
        )
    if isinstance(written, list):
        return (
            isinstance(printed, list) and len(printed) == len(written) and all(map(holds, printed, written))
        )
    return printed == written


@pytest.mark.parametrize("stack", config_stacks(), ids=lambda stack: "+".join(Path(c).stem for c in stack))
def test_every_shipped_config_parses_and_keeps_its_values(stack, capsys):
    """What users start from must parse, with each value the last config in the stack wrote."""
    args = [a for c in stack for a in ("--config", c)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert exit_info.value.code in (0, None)
    merged: dict = {}
    for config in stack:
        for section, values in yaml.safe_load(Path(config).read_text()).items():
            # a later config replaces a section's keys it writes (a list such as trainer.callbacks whole)
            merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    for section in ("model", "data", "trainer", "tracking"):
        assert holds(printed[section], merged.get(section, {})), f"{stack}: {section}"


def test_unknown_key_and_bad_value_fail_clearly(tiny_shards, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main([*fit_args(tiny_shards, tmp_path), "--model.lossy=l1"])
    assert "lossy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*fit_args(tiny_shards, tmp_path), "--model.loss=l3"])
    assert "l3" in capsys.readouterr().err


def test_bad_timestep_range_is_rejected(tiny_shards, tmp_path):
    with pytest.raises(ValueError, match=r"t_min must not exceed t_max"):
        cli_main([*fit_args(tiny_shards, tmp_path), "--model.t_min=60", "--model.t_max=50"])


def test_import_reference_then_init_from_takes_over_adam_state(tiny_shards, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    cli_main(
        [
            "import-reference",
            "--gen",
            str(REF / "tiny_gen.pth"),
            "--opt",
            str(REF / "tiny_opt.pth"),
            "--out",
            str(ckpt),
        ]
    )
    model = SR3Module.load_from_checkpoint(ckpt)
    ref = torch.load(REF / "tiny_gen.pth", weights_only=True)
    assert torch.equal(model.unet.downs[0].weight, ref["denoise_fn.downs.0.weight"])
    saved = torch.load(REF / "tiny_opt.pth", weights_only=True)["optimizer"]["param_groups"][0]
    assert (saved["lr"], saved["weight_decay"]) == (1e-4, 0)
    configured = ["--model.optimizer=torch.optim.AdamW", "--model.optimizer.lr=3e-5"]
    for name, init_from in (("ref", REF / "tiny"), ("ours", ckpt)):  # the reference pair, our converted file
        run = tmp_path / name
        extra = (f"--model.init_from={init_from}", "--trainer.max_steps=1", *configured)
        cli = cli_main(fit_args(tiny_shards, run, *extra, "--model.optimizer.weight_decay=0.05"))
        optimizer = cli.trainer.optimizers[0]
        assert float(optimizer.state_dict()["state"][0]["step"]) == 3.0  # the reference's 2 steps + ours
        group = optimizer.param_groups[0]  # the moments are taken over, the config's settings kept
        assert (group["lr"], group["weight_decay"]) == (3e-5, 0.05)


def test_a_trained_run_no_longer_needs_the_weights_it_started_from(tiny_shards, tmp_path):
    init = tmp_path / "init"
    for suffix in ("_gen.pth", "_opt.pth"):
        (tmp_path / f"init{suffix}").write_bytes((REF / f"tiny{suffix}").read_bytes())
    args = fit_args(tiny_shards, tmp_path / "run", f"--model.init_from={init}", "--trainer.max_steps=1")
    cli_main(args)
    for suffix in ("_gen.pth", "_opt.pth"):  # moved, or the run copied to a machine without them
        (tmp_path / f"init{suffix}").unlink()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert cli_main([*args[:-1], "--trainer.max_steps=2"]).trainer.global_step == 2  # resumes
    cli = cli_main(["validate", *args[1:]])
    assert cli.trainer.ckpt_path == str(last) and "val/anime/loss" in cli.trainer.callback_metrics
    assert SR3Module.load_from_checkpoint(last).hparams.init_from == str(init)  # sample's load: named only
    with pytest.raises(ValueError, match="init_from=.*init_gen.pth does not exist"):
        cli_main([*args, "--fresh=true"])  # a new run starts from those weights: it still needs them


def test_import_reference_bad_file_is_one_paragraph_without_traceback(tmp_path):
    bad = tmp_path / "broken_gen.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sr3_lightning",
            "import-reference",
            "--gen",
            str(bad),
            "--out",
            str(tmp_path / "x.ckpt"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "broken_gen.pth could not be read" in proc.stderr


def test_import_reference_names_a_folder_out_and_one_of_our_checkpoints(tmp_path, capsys):
    ours = tmp_path / "tiny.ckpt"
    for gen, out, message in (
        (REF / "tiny_gen.pth", tmp_path, f"--out {tmp_path} is a folder; name the checkpoint file"),
        (REF / "tiny_gen.pth", ours, None),
        (ours, tmp_path / "again.ckpt", f"{ours} is already an sr3-lightning checkpoint: use it as it is"),
    ):
        argv = ["import-reference", "--gen", str(gen), "--out", str(out)]
        if message is None:
            cli_main(argv)
            continue
        with pytest.raises(SystemExit):
            cli_main(argv)
        assert message in capsys.readouterr().err


def test_sample_super_resolves_a_folder_of_lr_images(tmp_path, caplog):
    ckpt = tmp_path / "tiny.ckpt"
    cli_main(["import-reference", "--gen", str(REF / "tiny_gen.pth"), "--out", str(ckpt)])
    inputs = tmp_path / "lr"
    inputs.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(inputs / f"face{i}.png")
    Image.new("RGB", (48, 40)).save(inputs / "large.png")  # larger than the 32 px model: shrunk, and said
    out = tmp_path / "sr"
    cli_main(
        [
            "sample",
            "--ckpt",
            str(ckpt),
            "--input",
            str(inputs),
            "--out",
            str(out),
            "--sampler=ddim",
            "--steps=5",
            "--batch-size=2",
        ]
    )
    assert sorted(p.name for p in out.glob("*_sr.png"))[:3] == [
        "face0_sr.png",
        "face1_sr.png",
        "face2_sr.png",
    ]
    assert Image.open(out / "face0_sr.png").size == (32, 32) and (out / "sheet.png").is_file()
    assert (
        "1 input(s) are larger than the model's 32 px and are shrunk to it, not super-resolved: large.png"
        in (caplog.text)
    )


def test_resume_with_other_model_settings_is_refused_naming_them(tiny_shards, tmp_path):
    args = fit_args(tiny_shards, tmp_path, "--trainer.max_steps=1")
    cli_main(args)
    config = (tmp_path / "config.yaml").read_text()
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"model\.loss: l2 \(checkpoint: l1\).*--fresh"):
        cli_main([*args, "--model.loss=l2", f"--ckpt_path={last}"])  # Lightning would swap l1 back in
    with pytest.raises(ValueError, match=r"model\.unet\.inner_channel: 16 \(checkpoint: 8\)"):
        cli_main([*args, "--model.unet.inner_channel=16"])  # found by the automatic resume
    adam = ["--model.optimizer=torch.optim.Adam", "--model.optimizer.lr=0.01"]
    with pytest.raises(ValueError, match=r"model\.optimizer\.lr: 0\.01 \(checkpoint: 0\.0001\)"):
        cli_main([*args[:-1], "--trainer.max_steps=2", *adam])  # the resume would restore lr 1e-4
    cli_main([*args[:-1], "--trainer.max_steps=0"])  # already past it: nothing is run or rewritten
    assert (tmp_path / "config.yaml").read_text() == config
    cli = cli_main([*args[:-1], "--trainer.max_steps=2", "--model.fused_attention=false"])  # speed only
    assert cli.trainer.global_step == 2 and not cli.model.hparams.fused_attention


def test_a_scheduler_s_moving_lr_and_betas_are_not_taken_for_changed_settings(tiny_shards, tmp_path):
    one_cycle = [
        "--model.lr_scheduler=torch.optim.lr_scheduler.OneCycleLR",
        "--model.lr_scheduler.max_lr=0.001",
        "--model.lr_scheduler.total_steps=10",
    ]
    cli_main(fit_args(tiny_shards, tmp_path, *one_cycle, "--trainer.max_steps=2"))
    assert (
        cli_main(fit_args(tiny_shards, tmp_path, *one_cycle, "--trainer.max_steps=4")).trainer.global_step
        == 4
    )


def test_validate_logs_beside_the_training_run_not_into_it(tiny_shards, tmp_path, caplog):
    cli_main(fit_args(tiny_shards, tmp_path, "--trainer.max_steps=1"))
    before = {name: (tmp_path / name).read_text() for name in ("config.yaml", "metrics.csv")}
    last = tmp_path / "checkpoints" / "last.ckpt"
    cli = cli_main(["validate", *fit_args(tiny_shards, tmp_path)[1:], f"--ckpt_path={last}"])
    assert "val/anime/loss" in cli.trainer.callback_metrics
    assert "these config values are not used" not in caplog.text
    other = (
        "--model.loss=l2",
        "--model.t_max=50",
    )  # the checkpoint's settings win, and the config's are named
    cli = cli_main(["validate", *fit_args(tiny_shards, tmp_path, *other)[1:], f"--ckpt_path={last}"])
    assert (cli.model.hparams.loss, cli.model.hparams.t_max) == ("l1", None)
    replaced = "model.loss: l2 (checkpoint: l1); model.t_max: 50 (checkpoint: 100)"
    assert (
        f"the model is built as {last} was trained; these config values are not used: {replaced}"
        in caplog.text
    )
    assert {name: (tmp_path / name).read_text() for name in before} == before
    rows = list(csv.DictReader((tmp_path / "validate" / "metrics.csv").read_text().splitlines()))
    assert [(r["step"], bool(r["val/anime/loss"])) for r in rows] == [("1", True)]  # the checkpoint's step
    cli = cli_main(["validate", *fit_args(tiny_shards, tmp_path)[1:]])  # no --ckpt_path: the run's newest
    assert cli.trainer.ckpt_path == str(last)
    elsewhere = tmp_path / "another_run"  # a config naming another run: rows go to the checkpoint's run
    cli_main(["validate", *fit_args(tiny_shards, elsewhere)[1:], f"--ckpt_path={last}"])
    assert not elsewhere.exists()
    assert len((tmp_path / "validate" / "metrics.csv").read_text().splitlines()) == 2  # step 1 replaced
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        cli_main(["validate", *fit_args(tiny_shards, tmp_path)[1:], f"--ckpt_path={tmp_path}/missing.ckpt"])
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="garbage.ckpt cannot be read .* truncated or not an sr3-lightning"):
        cli_main(["validate", *fit_args(tiny_shards, tmp_path)[1:], f"--ckpt_path={tmp_path}/garbage.ckpt"])


def test_test_measures_a_checkpoint_as_its_training_run_did(tiny_shards, tmp_path, monkeypatch, capsys):
    evaluation = [
        "--trainer.callbacks+=sr3_lightning.callbacks.DomainEval",
        "--trainer.callbacks.lpips=false",
        "--trainer.callbacks.steps=4",
        "--trainer.callbacks.original_domains=[anime]",
    ]
    cli_main(fit_args(tiny_shards, tmp_path, "--trainer.max_steps=2", *evaluation))
    trained = {name: (tmp_path / name).read_text() for name in ("config.yaml", "metrics.csv")}
    fit_rows = {r["step"]: r for r in csv.DictReader(trained["metrics.csv"].splitlines())}

    cli = cli_main(["test", *fit_args(tiny_shards, tmp_path, *evaluation)[1:]])  # the run's newest
    assert cli.trainer.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    tested_dir = tmp_path / "test" / "ddpm-4-seed0"  # a directory per sampler setting
    rows = list(csv.DictReader((tested_dir / "metrics.csv").read_text().splitlines()))
    measured = {k: v for r in rows for k, v in r.items() if v and r["step"] == "2"}
    for key in ("val/anime/psnr", "val/anime/ssim", "val/anime/bicubic_psnr", "forget/anime/psnr"):
        assert float(measured[key]) == float(fit_rows["2"][key]), key  # the same noise, the same numbers
    assert "val/anime/loss" in measured and {r["step"] for r in rows} == {"2"}
    printed = capsys.readouterr().out.splitlines()
    header = printed.index(
        f"DomainEval of the weights at step 2, ddpm-4-seed0 (per-image values: {tested_dir}/eval/):"
    )
    table = [line.split() for line in printed[header + 1 : header + 5]]
    assert table[0][:3] == ["domain", "psnr", "ssim"] and [row[0] for row in table[1:]] == ["anime"] * 3
    assert float(table[1][1]) == pytest.approx(float(measured["val/anime/psnr"]), abs=1e-4)
    assert table[3][:3] == ["anime", "forget", f"{float(measured['forget/anime/psnr']):+.4f}"]
    tested = (tested_dir / "eval" / "anime_step000002.csv").read_text()
    assert tested == (tmp_path / "eval" / "anime_step000002.csv").read_text()
    assert {name: (tmp_path / name).read_text() for name in trained} == trained

    other_images = "--data.val=[{domain: anime, shards: " + str(tiny_shards) + ", num_images: 3}]"
    cli = cli_main(["test", *fit_args(tiny_shards, tmp_path, *evaluation)[1:], other_images])
    metrics = {k: v.item() for k, v in cli.trainer.callback_metrics.items()}
    assert not any(k.startswith("forget/") for k in metrics)  # the baseline measured 4 other images
    assert "No forget/* rows" in capsys.readouterr().out
    four_steps = (tested_dir / "metrics.csv").read_text()
    measured = [
        float(r["val/anime/psnr"]) for r in csv.DictReader(four_steps.splitlines()) if r["val/anime/psnr"]
    ]
    assert measured == [pytest.approx(metrics["val/anime/psnr"])]  # step 2 measured again: its rows replaced
    cli_main(["test", *fit_args(tiny_shards, tmp_path, *evaluation)[1:], "--trainer.callbacks.steps=2"])
    other_sampler = (tmp_path / "test" / "ddpm-2-seed0" / "metrics.csv").read_text()
    assert {r["step"] for r in csv.DictReader(other_sampler.splitlines())} == {"2"}
    assert (tested_dir / "metrics.csv").read_text() == four_steps  # each setting's rows apart
    with monkeypatch.context() as patch:
        patch.setattr(DomainEval, "on_test_start", Mock(side_effect=RuntimeError("out of memory")))
        with pytest.raises(RuntimeError, match="out of memory"):
            cli_main(["test", *fit_args(tiny_shards, tmp_path, *evaluation)[1:]])
    assert (tested_dir / "metrics.csv").read_text() == four_steps  # cut off: the earlier rows stay

    pretrained = tmp_path / "pretrained"  # no checkpoint: the init_from weights, before any tuning
    cli = cli_main(
        ["test", *fit_args(tiny_shards, pretrained, *evaluation)[1:], f"--model.init_from={REF / 'tiny'}"]
        + [other_images]
    )
    assert not any(k.startswith("forget/") for k in cli.trainer.callback_metrics)  # no baseline to compare
    assert cli.trainer.callback_metrics["val/anime/bicubic_psnr"].item() == metrics["val/anime/bicubic_psnr"]
    assert metrics["val/anime/bicubic_psnr"] != float(fit_rows["2"]["val/anime/bicubic_psnr"])
    assert (pretrained / "test" / "ddpm-4-seed0" / "eval" / "anime_step000000.csv").exists()

    with pytest.raises(ValueError, match="test super-resolves the val domains with the DomainEval callback"):
        cli_main(["test", *fit_args(tiny_shards, tmp_path)[1:]])
    with pytest.raises(ValueError, match="trainer.limit_test_batches=0 skips the test loop"):
        cli_main(
            ["test", *fit_args(tiny_shards, tmp_path, *evaluation)[1:], "--trainer.limit_test_batches=0"]
        )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_lpips_weights"))
    with pytest.raises(LpipsWeightsMissing, match=r"alexnet-owt-7be5be79\.pth"):
        cli_main(["test", *fit_args(tiny_shards, tmp_path, *evaluation[:1])[1:]])


def test_only_fit_validate_and_test_are_offered_and_the_optimizer_is_the_model_s(
    tiny_shards, tmp_path, capsys
):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    subcommands = capsys.readouterr().out
    assert "{fit,validate,test}" in subcommands and "predict" not in subcommands
    with pytest.raises(
        ValueError, match="--lr_scheduler is not used by sr3-lightning: set model.lr_scheduler"
    ):
        cli_main([*fit_args(tiny_shards, tmp_path), "--lr_scheduler=torch.optim.lr_scheduler.StepLR"])
    old = {"optimizer": None, "lr_scheduler": None, "trainer": {"max_steps": 1}}  # as earlier versions saved
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    cli = cli_main([*fit_args(tiny_shards, tmp_path), "--config", str(tmp_path / "old.yaml")])
    assert cli.trainer.global_step == 1


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sr3_lightning", *args], capture_output=True, text=True)


def test_command_line_shows_progress_lines_and_bad_input_without_traceback(tiny_shards, tmp_path):
    ok = run_module(
        *fit_args(tiny_shards, tmp_path / "a", f"--model.init_from={REF / 'tiny'}"), "--trainer.max_steps=1"
    )
    assert ok.returncode == 0, ok.stderr
    assert f"initialised from reference {REF / 'tiny_gen.pth'}" in ok.stderr
    assert "args parameter" not in ok.stderr  # LightningCLI reads sys.argv itself
    assert "Tip:" not in ok.stderr and "LeafSpec" not in ok.stderr  # library noise, not about the run
    bad = run_module(*fit_args(tmp_path / "nowhere", tmp_path / "b"), "--trainer.max_steps=1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: " in bad.stderr and "nowhere" in bad.stderr
    assert not (tmp_path / "b").exists()  # no run directory (nor W&B run) for a run that cannot start


def test_our_input_checks_exit_in_one_line_but_a_library_error_keeps_its_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info, bad_input_exits():
        make_betas("cosine-ish", 10, 1e-4, 2e-2)
    assert exit_info.value.code == 2 and "unknown beta schedule 'cosine-ish'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only one of size or scale_factor"), bad_input_exits():
        torch.nn.functional.interpolate(torch.zeros(1, 1, 4, 4), size=(8, 8), scale_factor=2.0)
    with pytest.raises(SystemExit), bad_input_exits():
        Path("nowhere.ckpt").read_bytes()


def test_resume_compares_what_settings_mean_not_how_they_are_written():
    saved = {"t_max": None, "num_timesteps": 100, "unet": {"inner_channel": 8}, "beta_end": 0.01, "seed": 0}
    now = {"t_max": 100, "num_timesteps": 100, "unet": {"inner_channel": 8, "added_later": 3}}
    now |= {"beta_end": 1e-2, "seed": 0, "weight_init": "default", "compile": True}  # init only; speed
    assert changed_settings(now, {**saved, "weight_init": "orthogonal", "compile": False}) == []
    assert changed_settings({**now, "t_max": 50, "seed": 1}, saved) == [
        "model.seed: 1 (checkpoint: 0)",
        "model.t_max: 50 (checkpoint: 100)",
    ]
