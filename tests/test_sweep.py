"""Sweeps: the study files validate against the CLI, bad input fails early, agents per GPU, and the local
backend killed after its first run resumes so that every grid point runs exactly once, then reports."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sr3_lightning import report
from sr3_lightning.cli import cli_main
from sr3_lightning.module import SR3Module
from sr3_lightning.sweep.local import RECORDS, build_command, grid_extension, read_records, run_local
from sr3_lightning.sweep.spec import Sweep, check_parameters, load_sweep, sweep_engine
from sr3_lightning.sweep.wandb_agents import Agent, agent_processes, run_agents
from sr3_lightning.wandb_offline import read_history
from tests.reference import TINY

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("steps", "data", "data_draws", "timesteps", "forgetting")


def grid(sweep) -> list[dict]:
    """Every run the W&B engine proposes for a grid sweep, as {parameter: value}."""
    runs = []
    while (run := sweep_engine().next_run(sweep.config, runs)) is not None:
        runs.append(run)
    return [{k: v["value"] for k, v in r.config.items()} for r in runs]


def domain_eval(cfg) -> dict:
    return next(c.init_args for c in cfg.trainer.callbacks if c.class_path.endswith("DomainEval"))


def test_study_sweeps_are_accepted_by_fit_and_match_the_report(monkeypatch):
    monkeypatch.chdir(REPO)
    configs = {}
    for name in STUDIES:
        sweep = load_sweep(f"sweeps/{name}.yaml")
        configs[name] = check_parameters(sweep, inputs=False)  # parses; the studies' data is not here
        assert sweep.method == "grid" and sweep.fit_args[:2] == ["--config", "configs/finetune_anime.yaml"]
    steps = load_sweep("sweeps/steps.yaml")
    assert grid(steps) == [{"model.loss": "l1"}, {"model.loss": "l2"}]  # 2 trajectories, not 12 runs
    assert set(domain_eval(configs["steps"]).at_steps) == set(report.STEPS["l1"] + report.STEPS["l2"])
    assert configs["steps"].trainer.max_steps == max(report.STEPS["l2"])
    assert [p["data.train.limit"] for p in grid(load_sweep("sweeps/data.yaml"))] == list(report.DATA_SIZES)
    draws = {
        (p["data.train.limit"], p["data.train.subset_seed"])
        for p in grid(load_sweep("sweeps/data_draws.yaml"))
    }
    assert draws == {(n, seed) for n in report.DATA_SIZES for seed in (1, 2)}
    assert configs["data_draws"].data.train.subset_seed in (1, 2)  # the parameter reaches the data module
    ranges = [(p["model"]["t_min"], p["model"]["t_max"]) for p in grid(load_sweep("sweeps/timesteps.yaml"))]
    assert ranges == list(report.T_RANGES)
    assert set(domain_eval(configs["forgetting"]).at_steps) == set(report.FORGET_STEPS)
    assert domain_eval(configs["forgetting"]).original_domains == ["ffhq", "celebahq"]


def sweep_error(tmp_path, capsys, text: str, *extra: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(path), "--check", *extra])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_sweeps_and_gpus_fail_before_any_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    good = (REPO / "sweeps/steps.yaml").read_text()
    err = sweep_error(tmp_path, capsys, good.replace("model.loss:", "model.lossy:"))
    assert "model.lossy" in err and "unrecognized" in err
    err = sweep_error(tmp_path, capsys, good.replace("model.loss:", "model.los:"))  # no prefix matching
    assert "model.los" in err and "unrecognized" in err
    err = sweep_error(tmp_path, capsys, good.replace("{values: [l1, l2]}", "[l1, l2]"))
    assert "not a valid W&B sweep" in err and "write a parameter as {values: [...]}" in err
    assert "Traceback" not in err
    no_metric = good.replace("method: grid", "method: bayes").replace(
        "metric: {name: val/anime/psnr, goal: maximize}\n", ""
    )
    assert "a bayes sweep needs the metric it optimises" in sweep_error(tmp_path, capsys, no_metric)
    string_metric = good.replace("method: grid", "method: bayes").replace(
        "metric: {name: val/anime/psnr, goal: maximize}", "metric: val/anime/psnr"
    )
    assert "Traceback" not in (err := sweep_error(tmp_path, capsys, string_metric)) and "not a valid" in err
    err = sweep_error(tmp_path, capsys, good.replace("[l1, l2]", "[l1, l3]"))
    assert "model.loss" in err and "l3" in err
    assert "'gridx' is not one of" in sweep_error(
        tmp_path, capsys, good.replace("method: grid", "method: gridx")
    )
    assert "not a W&B sweep" in sweep_error(tmp_path, capsys, "- just a list\n")
    assert "${args}" in sweep_error(tmp_path, capsys, good.replace("  - ${args}\n", ""))
    assert "same directory" in sweep_error(tmp_path, capsys, good.replace("/$WANDB_RUN_ID", ""))
    assert "GPU 99 does not exist" in sweep_error(tmp_path, capsys, good, "--gpus", "99")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no W&B login
    path = tmp_path / "steps.yaml"
    path.write_text(good)
    with pytest.raises(SystemExit):
        cli_main(["sweep", str(path), "--backend", "wandb"])
    assert "--backend local" in capsys.readouterr().err
    err = sweep_error(tmp_path, capsys, good.replace("[l1, l2]", "[l1, null]"))
    assert "model.loss lists null" in err and 'write it as the string "null"' in err
    nested = "  model: {values: [{t_min: 1, t_max: null}]}\n"
    assert "holds a null" in sweep_error(
        tmp_path, capsys, good.replace("  model.loss: {values: [l1, l2]}\n", nested)
    )
    env_sweep = (REPO / "sweeps/smoke.yaml").read_text()
    monkeypatch.delenv("SR3_SHARDS", raising=False)
    assert "SR3_SHARDS is not set" in sweep_error(tmp_path, capsys, env_sweep)


def test_check_runs_the_model_and_data_checks_on_every_combination(
    tiny_shards, tmp_path, capsys, monkeypatch
):
    """Values the parser accepts but SR3Module / SR3DataModule reject stop --check, each failing run named."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SR3_SHARDS", str(tiny_shards))
    smoke = (REPO / "sweeps/smoke.yaml").read_text()
    objective = "  model.objective: {values: [diffusion, regression]}\n"
    # tiny_cpu.yaml has num_timesteps 100: t_max 5000 is rejected by the module, in both runs that use it
    err = sweep_error(tmp_path, capsys, smoke.replace(objective, "  model.t_max: {values: [50, 5000]}\n"))
    assert "rejects 2 of 4 parameter combination(s)" in err and "use t_max <= 100" in err
    assert "--model.loss=l1 --model.t_max=5000 | --model.loss=l2 --model.t_max=5000" in err
    assert "t_max=50 " not in err
    err = sweep_error(tmp_path, capsys, smoke.replace(objective, "  data.batch_size: {values: [0, 2]}\n"))
    assert (
        "rejects 2 of 4" in err
        and "--data.batch_size=0 --model.loss=l1" in err
        and "batch_size must be" in err
    )
    # only one pairing of two valid-looking parameters is bad (t_min 80 > t_max 50): the full grid is checked
    pairs = "  model.t_min: {values: [1, 80]}\n  model.t_max: {values: [50, 100]}\n"
    err = sweep_error(tmp_path, capsys, smoke.replace(objective, pairs))
    assert "rejects 2 of 8" in err and "t_min must not exceed t_max" in err
    assert "--model.loss=l1 --model.t_max=50 --model.t_min=80" in err
    err = sweep_error(tmp_path, capsys, smoke.replace("{domain: ffhq,", "{domain: celebahq,"))
    assert "rejects 4 of 4" in err and "original_domains ['ffhq'] are not val domains" in err
    err = sweep_error(tmp_path, capsys, smoke.replace(objective, "  optimizer: {value: torch.optim.SGD}\n"))
    assert "--optimizer is not used by sr3-lightning: set model.optimizer instead" in err
    err = sweep_error(tmp_path, capsys, smoke.replace(objective, "  data.train.limit: {values: [8, 23]}\n"))
    assert "rejects 2 of 4" in err and "limit 23 but" in err and "holds 24 images, 2 of them held out" in err
    err = sweep_error(
        tmp_path,
        capsys,
        smoke.replace(
            "{domain: ffhq, shards: ${envvar:SR3_SHARDS}, num_images: 2}",
            "{domain: ffhq, shards: ${envvar:SR3_SHARDS}, num_images: 99}",
        ),
    )
    assert (
        "rejects 4 of 4" in err and "val domain 'ffhq': num_images 99 but" in err and "holds 8 images" in err
    )
    cli_main(["sweep", "sweeps/smoke.yaml", "--check"])  # the good grid passes


def test_check_names_missing_checkpoints_and_shards_once_each(tiny_shards, tmp_path, capsys, monkeypatch):
    """Inputs every run reads first are looked up: a missing one is named with the runs it would stop."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SR3_SHARDS", str(tmp_path / "no_shards"))
    smoke = (REPO / "sweeps/smoke.yaml").read_text()
    err = sweep_error(tmp_path, capsys, smoke)
    missing = f"shard directory {tmp_path / 'no_shards'} (domain 'anime') does not exist"
    assert "rejects 4 of 4" in err and err.count(missing) == 1
    monkeypatch.setenv("SR3_SHARDS", str(tiny_shards))
    model = SR3Module(unet=dataclasses.replace(TINY, inner_channel=16), num_timesteps=100)  # tiny_cpu: 8
    wide = tmp_path / "wide.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, wide)
    init = f'  model.init_from: {{values: ["null", missing/I1_E1, missing/run.ckpt, {wide}]}}\n'
    err = sweep_error(
        tmp_path, capsys, smoke.replace("  model.objective: {values: [diffusion, regression]}\n", init)
    )
    assert "rejects 6 of 8" in err and "missing/I1_E1_gen.pth does not exist" in err
    assert "init_from=missing/run.ckpt: the checkpoint does not exist" in err
    assert f"init_from={wide} was trained with model.unet inner_channel: 16 (config: 8)" in err
    typo = smoke.replace("metric: {name: val/anime/psnr", "metric: {name: val/anime/psnrr")
    assert "metric 'val/anime/psnrr' is not a key the runs log" in sweep_error(tmp_path, capsys, typo)
    other = smoke.replace("metric: {name: val/anime/psnr", "metric: {name: val/celebahq/psnr")
    assert "names domain 'celebahq', but the runs evaluate anime, ffhq" in sweep_error(
        tmp_path, capsys, other
    )
    sizes = smoke.replace("configs/sweep_smoke.yaml\n", "configs/sweep_smoke.yaml\n  - --data.lr_size=4\n")
    assert "re-run make_shards with --lr 4" in sweep_error(tmp_path, capsys, sizes)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    lpips = smoke.replace(
        "configs/sweep_smoke.yaml\n", "configs/sweep_smoke.yaml\n  - --trainer.callbacks.lpips=true\n"
    )
    assert "[every run]: LPIPS needs the AlexNet weights at" in sweep_error(tmp_path, capsys, lpips)


def test_wandb_backend_starts_one_agent_per_gpu_with_its_device(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SERVICE", "3-1-unix-/this/process/service.sock")  # W&B ran in this process
    agents = agent_processes(
        "abc123", ["2", "3"], project="sr3-finetune", entity="lab", count=5, sweep_dir=Path("runs/steps")
    )
    assert [a.device for a in agents] == ["2", "3"]
    for agent, device in zip(agents, ["2", "3"]):
        assert agent.argv == [
            sys.executable,
            "-m",
            "wandb",
            "agent",
            "--forward-signals",
            "--project",
            "sr3-finetune",
            "--entity",
            "lab",
            "--count",
            "5",
            "abc123",
        ]
        assert agent.env["CUDA_VISIBLE_DEVICES"] == device and agent.env["SR3_SWEEP_DIR"] == "runs/steps"
        assert "WANDB_SERVICE" not in agent.env  # each agent starts its own W&B service
        assert agent.env["PATH"].split(os.pathsep)[0] == str(
            Path(sys.executable).parent
        )  # `python` = this env
    (single,) = agent_processes("abc123", None, project="p", entity=None, count=None, sweep_dir=Path("r"))
    assert single.argv[-3:] == ["--project", "p", "abc123"]
    assert single.env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")  # untouched


def test_agent_supervisor_reports_a_failed_agent_and_restarts_nothing(tmp_path, caplog):
    script = "import os, sys; open(sys.argv[1], 'a').write(os.environ['CUDA_VISIBLE_DEVICES']); sys.exit({})"
    agents = [
        Agent(
            d,
            [sys.executable, "-c", script.format(code), str(tmp_path / f"gpu{d}")],
            {"CUDA_VISIBLE_DEVICES": d},
        )
        for d, code in (("0", 0), ("1", 3))
    ]
    with caplog.at_level("INFO"):
        assert run_agents(agents, rejoin="python -m sr3_lightning sweep s.yaml --sweep-id abc") == 3
    assert (tmp_path / "gpu0").read_text() == "0" and (tmp_path / "gpu1").read_text() == "1"  # once each
    assert "GPU 1 exited with code 3 and was not restarted" in caplog.text
    assert "--sweep-id abc --gpus 1" in caplog.text


def test_local_backend_runs_the_agents_command(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SR3_SHARDS", "/data/shards")
    command = build_command(
        load_sweep("sweeps/smoke.yaml"), {"model.loss": "l2", "model.objective": "regression"}
    )
    assert command[:3] == ["/usr/bin/env", "sh", "-c"] and command[5] == sys.executable
    assert command[-2:] == ["--model.loss=l2", "--model.objective=regression"]
    assert "--data.train.shards=/data/shards" in command


def test_local_backend_records_failures_retries_them_on_relaunch_and_needs_count_for_random(tmp_path):
    # A stand-in for fit: records its arguments, creates its run directory and config, fails for l2.
    script = (
        'mkdir -p "$SR3_SWEEP_DIR/$WANDB_RUN_ID"; touch "$SR3_SWEEP_DIR/$WANDB_RUN_ID/config.yaml"; '
        'echo "$*" >> "$SR3_SWEEP_DIR/../calls"; case "$*" in *l2*) exit 1;; esac; '
        'test ! -f "$SR3_SWEEP_DIR/../fail_all"'
    )
    command = ["${env}", "sh", "-c", script, "sh", "${args}"]
    config = {"method": "grid", "parameters": {"model.loss": {"values": ["l1", "l2"]}}, "command": command}
    sweep_dir = tmp_path / "sweep"
    for _ in range(2):
        ended = run_local(Sweep(tmp_path / "s.yaml", config, []), sweep_dir)
        assert ended[-1]["state"] == "failed" and ended[-1]["exit_code"] == 1
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("--model.loss=l1" in c for c in calls) == 1 and sum("--model.loss=l2" in c for c in calls) == 2
    (l1_dir,) = [d for d in sweep_dir.iterdir() if d.name.startswith("l1")]
    shutil.rmtree(l1_dir)  # a finished run whose directory is gone is done again ...
    (tmp_path / "fail_all").touch()
    run_local(Sweep(tmp_path / "s.yaml", config, []), sweep_dir)
    (tmp_path / "fail_all").unlink()  # ... and when that fails, its failure is the record that counts
    run_local(Sweep(tmp_path / "s.yaml", config, []), sweep_dir)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("--model.loss=l1" in c for c in calls) == 3 and (l1_dir / "config.yaml").is_file()
    with pytest.raises(ValueError, match=f"different sweep .* report {sweep_dir} {sweep_dir}_2 --out"):
        run_local(Sweep(tmp_path / "s.yaml", {**config, "method": "random"}, []), sweep_dir, count=1)
    wider = {**config, "parameters": {"model.loss": {"values": ["l1", "l2", "l3"]}}}  # the grid, extended
    run_local(Sweep(tmp_path / "s.yaml", wider, []), sweep_dir)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [sum(f"--model.loss={v}" in c for c in calls) for v in ("l1", "l2", "l3")] == [3, 5, 1]
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) == wider  # only the new point ran (and
    with pytest.raises(ValueError, match="different sweep"):  # the failed one retried); a removed value:
        run_local(Sweep(tmp_path / "s.yaml", config, []), sweep_dir)
    as_bool = {**config, "parameters": {"model.loss": {"values": ["l1", "l2", "l3", True]}}}
    assert grid_extension(wider, as_bool) == ["model.loss += [true]"]  # compared as the flags read them:
    assert (
        grid_extension(
            {"method": "grid", "parameters": {"a": {"values": [1]}}},
            {"method": "grid", "parameters": {"a": {"values": [True]}}},
        )
        is None
    )
    one = {**config, "parameters": {"model.loss": {"value": "l1"}, "n": {"parameters": {"x": {"value": 1}}}}}
    two = {**one, "parameters": {**one["parameters"], "model.loss": {"values": ["l1", "l2"]}}}
    assert grid_extension(one, two) == ['model.loss += ["l2"]']  # a fixed value becomes a list
    random_sweep = Sweep(tmp_path / "s.yaml", {**config, "method": "random"}, [])
    with pytest.raises(ValueError, match="--count"):
        run_local(random_sweep, tmp_path / "random")
    ended = run_local(random_sweep, tmp_path / "random", count=5)
    assert len({r["run_id"] for r in ended}) == 5  # repeated values are new runs, not resumes


def logged(run_dir: Path, step: int, key: str) -> float:
    """The value a run logged to its CSV at a step (read independently of the report)."""
    with (run_dir / "metrics.csv").open() as f:
        values = [float(r[key]) for r in csv.DictReader(f) if int(r["step"]) == step and r.get(key)]
    return values[-1]


@pytest.mark.slow
def test_smoke_sweep_killed_after_first_run_resumes_each_grid_point_once_then_reports(
    tiny_shards, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SR3_SHARDS", str(tiny_shards))
    # as left by a W&B run earlier in this process: runs must not attach to a service that is not theirs
    monkeypatch.setenv("WANDB_SERVICE", "3-1-unix-/no/such/service.sock")
    sweep_dir, out = tmp_path / "sweep", tmp_path / "report"
    args = ["sweep", "sweeps/smoke.yaml", "--backend", "local", "--dir", str(sweep_dir)]
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sr3_lightning", *args], stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not read_records(sweep_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the second run is starting or running
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()
    (first,) = read_records(sweep_dir)
    first_csv = Path(first["run_dir"]) / "metrics.csv"
    first_mtime = first_csv.stat().st_mtime_ns

    cli_main(args)  # relaunch: skips the finished run, redoes the cut-off one, runs the rest

    records = read_records(sweep_dir)
    assert [r["state"] for r in records] == ["finished"] * 4
    points = sorted((r["params"]["model.loss"], r["params"]["model.objective"]) for r in records)
    assert points == [("l1", "diffusion"), ("l1", "regression"), ("l2", "diffusion"), ("l2", "regression")]
    assert first_csv.stat().st_mtime_ns == first_mtime  # not run again
    assert json.loads((sweep_dir / RECORDS).read_text().splitlines()[0])["run_id"] == first["run_id"]
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["method"] == "grid"

    cli_main(["report", str(sweep_dir), "--out", str(out)])
    with (out / "report.csv").open() as f:
        numbers = list(csv.DictReader(f))
    rows = {(r["row"], r["key"]): r for r in numbers}
    for r in numbers:  # every number in the tables is what the run logged at that step
        assert float(r["value"]) == logged(Path(r["run"]), int(r["step"]), r["key"]), r
    for rec in records:
        run_dir, loss = Path(rec["run_dir"]), rec["params"]["model.loss"]
        if rec["params"]["model.objective"] == "diffusion":
            for label in ("1 step", "2 steps"):  # the DomainEval steps listed in configs/sweep_smoke.yaml
                assert rows[(f"loss={loss}, {label}", "val/anime/psnr")]["run"] == str(run_dir)
        else:
            assert rows[(f"Regression (loss={loss}, 2 steps)", "val/ffhq/ssim")]["run"] == str(run_dir)
        history = [h for h in read_history(run_dir / "wandb") if "val/anime/psnr" in h]  # W&B offline too
        assert {h["trainer/global_step"]: h["val/anime/psnr"] for h in history}[2] == logged(
            run_dir, 2, "val/anime/psnr"
        )
    assert ("Bicubic", "val/anime/bicubic_psnr") in rows and (
        "Step 0 (before fine-tuning)",
        "val/ffhq/psnr",
    ) in rows
    text = (out / "report.md").read_text()
    assert "| Bicubic |" in text and "| Regression (loss=l2, 2 steps) |" in text
    for plot in ("metrics_anime.png", "metrics_ffhq.png", "forgetting_ffhq.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in text


def test_a_run_stopped_and_continued_is_timed_over_both_launches(tmp_path):
    """The report's cost table divides a run's seconds by its steps: a continued run counts both parts."""
    from sr3_lightning.sweep.local import _end, _Trial

    (tmp_path / "r1").mkdir()
    now = time.monotonic()
    for started, stopped in ((now - 30, True), (now - 20, False)):  # 30 s cut off by a stop, then 20 s
        trial = _Trial("r1", {"model.loss": "l1"}, None, None, tmp_path / "r1.log", started=started)
        record = _end(tmp_path, trial, 0, None, stopped=stopped)
    assert record is not None and 50 <= record["seconds"] < 52
    assert read_records(tmp_path) == [record]
