"""The report lays runs out as the study's Tables 1-4: each row read at its step from whichever run has that
setting, with bicubic, step-0 and regression rows, at the study's precision, plus CSV and plots.

The runs here are run directories written the way a finished run leaves them (``config.yaml`` as saved by
``fit``, ``metrics.csv`` with the CSV logger's columns); the end-to-end path from real runs is in
``test_sweep.py``.
"""

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from sr3_lightning import report, report_plots
from sr3_lightning.cli import cli_main
from sr3_lightning.replicates import replicate_groups, seeds_of
from sr3_lightning.runs import load_runs

DOMAINS = ("anime", "ffhq", "celebahq")
METRICS = ("psnr", "ssim", "lpips", "consistency")


def value(run: str, step: int, domain: str, metric: str) -> float:
    """A distinct, reproducible number per run/step/key."""
    return (sum(map(ord, run + domain + metric)) % 97) / 7.0 + step / 1e4 + 0.123456


def write_run(
    root: Path,
    name: str,
    *,
    loss="l1",
    limit=128,
    t=(1, None),
    objective="diffusion",
    max_steps=2000,
    at_steps=(400, 1200, 1600, 2000),
    stopped_at=None,
    model=(),
    evaluation=(),
    seed: int | bool = 0,
    model_seed: int = 0,
    subset_seed: int | None = None,
) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "model": {
            "loss": loss,
            "t_min": t[0],
            "t_max": t[1],
            "objective": objective,
            "num_timesteps": 2000,
            "seed": model_seed,
        }
        | dict(model),
        "data": {
            "train": {
                "domain": "anime",
                "shards": "data/shards/anime",
                "limit": limit,
                "subset_seed": subset_seed,
            }
        },
        "trainer": {
            "max_steps": max_steps,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True},
                },
                {
                    "class_path": "sr3_lightning.callbacks.DomainEval",
                    "init_args": {"at_steps": list(at_steps), "original_domains": ["ffhq", "celebahq"]}
                    | dict(evaluation),
                },
            ],
        },
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    keys = [f"val/{d}/{p}{m}" for d in DOMAINS for p in ("", "bicubic_") for m in METRICS]
    keys += [f"forget/{d}/{m}" for d in ("ffhq", "celebahq") for m in METRICS]
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "train/loss", "val/anime/loss", *keys])
        writer.writeheader()
        for step in (0, *(s for s in at_steps if stopped_at is None or s <= stopped_at)):
            writer.writerow({"step": step, "val/anime/loss": 0.5})  # the validation loop's own row
            row = {"step": step}
            for key in keys:
                kind, domain, metric = key.split("/")
                if metric.startswith("bicubic"):  # lr_up vs HR: the same at every step
                    row[key] = value("bicubic", 0, domain, metric)
                else:
                    run = name if step else "pretrained"
                    row[key] = value(run, step, domain, metric) * (-0.01 if kind == "forget" else 1)
            writer.writerow(row)
            writer.writerow({"step": step, "train/loss": 0.1})
    return run_dir


@pytest.fixture
def study_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    union = sorted(set(report.STEPS["l1"] + report.STEPS["l2"]))
    write_run(root / "steps", "l1", max_steps=18000, at_steps=union)
    write_run(root / "steps", "l2", loss="l2", max_steps=18000, at_steps=union)
    write_run(root / "data", "limit8", limit=8)
    write_run(root / "timesteps", "t1-100", t=(1, 100))
    write_run(root / "baselines", "regression", objective="regression")
    return root


def md_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_report_lays_out_the_study_tables_at_their_steps(study_runs, tmp_path):
    out = tmp_path / "report"
    cli_main(["report", str(study_runs), "--out", str(out)])
    text = (out / "report.md").read_text()
    with (out / "report.csv").open() as f:
        numbers = {(r["table"][:7], r["row"], r["key"]): r for r in csv.DictReader(f)}

    def number(table: str, row: str, key: str) -> tuple[str, int, float]:
        r = numbers[(table, row, key)]
        return Path(r["run"]).name, int(r["step"]), float(r["value"])

    # Table 1: each loss is one trajectory, read at the steps its row lists; columns per domain.
    assert number("Table 1", "L1, 12000 steps", "val/anime/psnr") == (
        "l1",
        12000,
        value("l1", 12000, "anime", "psnr"),
    )
    assert number("Table 1", "L2, 18000 steps", "val/ffhq/lpips")[:2] == ("l2", 18000)
    assert not any(k[1] == "L1, 18000 steps" for k in numbers)  # not a study row
    assert number("Table 1", "Step 0 (before fine-tuning)", "val/celebahq/ssim")[:2] == ("l1", 0)
    assert number("Table 1", "Bicubic", "val/anime/bicubic_psnr")[2] == value(
        "bicubic", 0, "anime", "bicubic_psnr"
    )
    regression = "Regression (loss=l1, images=128, t_max=2000, 2000 steps)"
    assert number("Table 1", regression, "val/anime/psnr")[:2] == ("regression", 2000)
    # Table 2 takes 128 images from the L1 trajectory at 2000 steps; Table 3 likewise for t in [1, 2000].
    assert number("Table 2", "128 images", "val/anime/psnr")[:2] == ("l1", 2000)
    assert number("Table 2", "8 images", "val/anime/psnr")[:2] == ("limit8", 2000)
    assert "Not in these runs: 16 images, 32 images, 64 images." in text
    assert number("Table 3", "t in [1, 100]", "val/anime/ssim")[:2] == ("t1-100", 2000)
    assert number("Table 3", "t in [1, 2000]", "val/anime/ssim")[:2] == ("l1", 2000)
    # Table 4: the original domains at step 0 and after 2000/4000/12000 steps, with the logged change.
    assert number("Table 4", "ffhq: after 4000 steps", "forget/ffhq/psnr") == (
        "l1",
        4000,
        value("l1", 4000, "ffhq", "psnr") * -0.01,
    )
    assert number("Table 4", "celebahq: bicubic", "val/celebahq/bicubic_lpips")[0] == "l1"
    # The markdown shows the study's precision: PSNR 2 decimals, SSIM and LPIPS 4, deltas signed.
    cells = md_row(text, "L1, 400 steps")
    assert cells[:3] == [
        f"{value('l1', 400, 'anime', m):.{d}f}" for m, d in (("psnr", 2), ("ssim", 4), ("lpips", 4))
    ]
    assert md_row(text, "ffhq: after 2000 steps")[3] == f"{value('l1', 2000, 'ffhq', 'psnr') * -0.01:+.2f}"
    assert "| Setting | anime PSNR | anime SSIM | anime LPIPS | ffhq PSNR |" in text
    assert "consistency" not in text.split("## Plots")[0].split("### Table 1")[1]  # not a study column
    for plot in (
        "metrics_anime",
        "metrics_ffhq",
        "metrics_celebahq",
        "forgetting_ffhq",
        "forgetting_celebahq",
    ):
        assert (out / f"{plot}.png").stat().st_size > 1000 and f"![{plot}]({plot}.png)" in text


def test_only_finished_runs_of_the_studys_setup_fill_the_tables(study_runs, tmp_path, caplog):
    lr = {"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}}
    write_run(study_runs / "steps", "a_lr1e-3", at_steps=(400, 2000), model=lr)
    write_run(study_runs / "baselines", "a_regression_lr1e-3", objective="regression", model=lr)
    write_run(
        study_runs / "steps", "a_ddim50", at_steps=(400, 2000), evaluation={"sampler": "ddim", "steps": 50}
    )
    write_run(
        study_runs / "steps", "a_stopped", loss="l2", max_steps=18000, at_steps=(400, 18000), stopped_at=5000
    )
    out = tmp_path / "report"
    cli_main(["report", str(study_runs), "--out", str(out)])
    with (out / "report.csv").open() as f:
        sources = {(r["table"][:7], r["row"]): Path(r["run"]).name for r in csv.DictReader(f)}
    assert sources[("Table 1", "L1, 400 steps")] == "l1" and sources[("Table 1", "L2, 400 steps")] == "l2"
    assert (
        "a_lr1e-3 differs from the study's setup in optimizer=Adam(lr=0.001) (study: default)" in caplog.text
    )
    assert any(
        row.endswith("optimizer=Adam(lr=0.001), 400 steps") for table, row in sources if table == "Other r"
    )
    ddim = "DomainEval sampler=ddim-50-eta0.0-seed0"  # measured with another sampler: not comparable
    assert f"a_ddim50 differs from the study's setup in {ddim} (study: ddpm-all-seed0)" in caplog.text
    assert any(row.endswith(f"{ddim}, 2000 steps") for table, row in sources if table == "Other r")
    text = (out / "report.md").read_text()
    assert "a_stopped: stopped before its last evaluation (evaluated up to step 400 of 18000)" in text
    assert "a_stopped" not in set(sources.values())
    tables_of = {table for table, _ in sources if sources[(table, _)] == "a_regression_lr1e-3"}
    assert tables_of == {"Other r"}  # not a Regression row of Tables 1-3
    assert "Study setup (the table rows' fixed settings): optimizer=default, init_from=None" in text


def test_columns_follow_the_configs_val_domains_and_equal_run_ids_are_told_apart(tmp_path):
    for sweep in ("a", "b"):
        run_dir = write_run(tmp_path / sweep, "l1-2000-abc", loss="l1" if sweep == "a" else "l2")
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["data"]["val"] = [{"domain": d, "shards": "x"} for d in ("celebahq", "anime", "ffhq")]
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    write_run(tmp_path / "c", "l1-2000-abc")  # the same grid point as a's, in another sweep
    cli_main(["report", str(tmp_path), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| Setting | celebahq PSNR | celebahq SSIM | celebahq LPIPS | anime PSNR |" in text
    assert "`loss=l1 (a/l1-2000-abc)`" in text and "`loss=l1 (c/l1-2000-abc)`" in text


def test_seed_replicates_of_a_recipe_are_averaged_and_each_counts_once(tmp_path, caplog):
    root, tuned = tmp_path / "runs", {"init_from": "checkpoints/I640000_E37"}  # fine-tuned, as the study
    write_run(root / "steps", "l1", max_steps=4000, at_steps=(400, 2000, 4000), model=tuned)
    write_run(root / "draws", "subset3", subset_seed=3, model=tuned)  # another draw of the 128 images
    write_run(root / "draws", "seed1", model_seed=1, model=tuned)  # other t, noise and dropout draws
    write_run(root / "again", "l1", max_steps=4000, at_steps=(400, 2000, 4000), model=tuned)  # same seeds:
    write_run(root / "lightning", "seed_everything1", seed=1, model=tuned)  # the same trajectory (init_from)
    other = write_run(root / "draws", "fresh-adam", model_seed=2, model=tuned | {"init_optimizer": False})
    out = tmp_path / "report"
    cli_main(["report", str(root), "--out", str(out)])
    with (out / "report.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["key"] == "val/anime/psnr"]
    lines = [r for r in rows if r["row"] == "L1, 2000 steps" and r["table"].startswith("Table 1")]
    names = ("l1", "seed1", "subset3")  # by source: again/l1 stands for steps/l1 and lightning/
    replicates = [value(n, 2000, "anime", "psnr") for n in names]
    assert [(Path(r["run"]).name, r["stat"]) for r in lines[:3]] == [(n, "replicate") for n in names]
    assert [float(r["value"]) for r in lines[:3]] == replicates
    mean, sd = statistics.fmean(replicates), statistics.stdev(replicates)
    assert [(r["stat"], float(r["value"])) for r in lines[3:]] == [("mean", mean), ("sd", sd)]
    text = (out / "report.md").read_text()
    other_label = "seed_everything=0, model.seed=2, subset_seed=None"
    assert md_row(text, "L1, 2000 steps (3 seeds)")[0] == f"{mean:.2f} ± {sd:.2f}"
    assert md_row(text, "L1, 4000 steps")[0] == f"{value('l1', 4000, 'anime', 'psnr'):.2f}"  # one run: no ±
    assert "mean ± sample standard deviation over the seeds" in text
    # Another recipe with the row's settings is not averaged in: named, with what differs, and listed.
    chosen = root / "again" / "l1"
    assert (
        f"{other} has the settings of row 'L1, 400 steps' but another recipe than the row's runs ({chosen}, "
        "...), so it is not averaged into the row: model.init_optimizer: false / (unset)" in caplog.text
    )
    assert caplog.text.count(f"{other} has the settings") == 1  # named once, not at every row
    others = {r["row"] for r in rows if r["table"].startswith("Other")} - {
        "Bicubic",
        "Step 0 (before fine-tuning)",
    }
    assert others == {
        f"{other_label}, {s} steps" for s in (400, 1200, 1600, 2000)
    }  # twins of used runs: shown
    assert md_row(text, "L1, 1200 steps (3 seeds)")  # by a replicate; 1200 from the runs that evaluated it
    # The plots and Other runs group the same way: one line per recipe and length, replicates as mean ± sd.
    runs = load_runs([str(root)])[0]
    groups = replicate_groups(runs, by_length=True)
    assert sorted(sorted(r.name for r in g) for g in groups) == [
        ["fresh-adam"],
        ["l1"],  # again/l1 stands for its twin steps/l1
        ["seed1", "seed_everything1", "subset3"],  # 2000 steps; seed_everything1 has again/l1's seeds
    ]
    (short,) = [g for g in groups if len(g) == 3]
    steps, means, sds = report_plots.trajectory(short, "val/anime/psnr")
    expected = [value(r.name, 2000, "anime", "psnr") for r in short]
    assert steps[-1] == 2000 and (means[-1], sds[-1]) == pytest.approx(
        (statistics.fmean(expected), statistics.stdev(expected))
    )


def test_seeds_tell_replicates_apart_and_seed_everything_counts_only_from_scratch():
    tuned = {"model": {"init_from": "x", "seed": 3}, "data": {"seed": 1, "train": {"subset_seed": 2}}}
    assert (
        seeds_of(tuned | {"seed_everything": 7}) == seeds_of(tuned | {"seed_everything": False}) == (3, 1, 2)
    )
    scratch = {"model": {"seed": 3}}
    assert seeds_of(scratch | {"seed_everything": 7}) == (3, 0, None, 7)  # its initial weights
    assert seeds_of(scratch | {"seed_everything": False})[-1] is None  # weights of its own: never merged


def test_a_sweeps_failed_and_vanished_runs_are_named_in_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "l1-ok")
    write_run(sweep, "l1-gone").joinpath("config.yaml").unlink()
    write_run(sweep, "l2-bad", loss="l2")
    records = [("l1-ok", "finished", 0), ("l1-gone", "finished", 0), ("l2-bad", "failed", 1)]
    lines = [json.dumps({"run_id": r, "state": st, "exit_code": c, "params": {}}) for r, st, c in records]
    (sweep / "runs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    cli_main(["report", str(sweep), "--out", str(out)])
    text = (out / "report.md").read_text()
    assert "1 finished run(s):" in text and "Left out 2 run(s):" in text
    assert f"{sweep / 'l1-gone'}: recorded as finished, but its config.yaml is gone" in text
    assert (
        f"{sweep / 'l2-bad'}: failed (log: {sweep / 'logs' / 'l2-bad.log'}); a grid's relaunch retries it"
        in text
    )


def test_report_errors_name_the_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for source, message in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "no finished runs"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["report", str(source), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    run = write_run(tmp_path, "run")
    for evaluation in ("validate", "test/ddpm-50-seed0"):  # `validate` / `test` of run's checkpoints
        shutil.copytree(run, run / evaluation, ignore=shutil.ignore_patterns("validate", "test"))
        with pytest.raises(SystemExit):
            cli_main(["report", str(run / evaluation), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert f"measurements of the checkpoints of {run} " in err and f"report {run}\n" in err
    (tmp_path / "report.md").write_text("not a folder")
    with pytest.raises(SystemExit):
        cli_main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "report.md")])
    assert "--out" in (err := capsys.readouterr().err) and "is a file; name a folder" in err


def test_report_names_runs_without_metrics_and_fails_when_none_has_any(tmp_path, capsys, caplog):
    root = tmp_path / "runs"
    write_run(root, "good")
    bare = write_run(root, "bare")  # DomainEval configured, but nothing evaluated
    (bare / "metrics.csv").write_text("step,train/loss\n1,0.5\n2,0.4\n")
    no_eval = root / "no_eval"  # a run without the DomainEval callback
    no_eval.mkdir()
    (no_eval / "config.yaml").write_text(
        yaml.safe_dump({"model": {"loss": "l1"}, "trainer": {"max_steps": 2}})
    )
    (no_eval / "metrics.csv").write_text("step,train/loss\n1,0.5\n2,0.4\n")
    out = tmp_path / "report"
    with caplog.at_level("WARNING"):
        cli_main(["report", str(root), "--out", str(out)])
    warning = next(r.getMessage() for r in caplog.records if "without evaluation metrics" in r.getMessage())
    assert "skipping 2 run(s)" in warning and f"{bare}: no DomainEval metrics" in warning
    assert f"{no_eval}: no DomainEval metrics (val/DOMAIN/psnr ...) in its metrics.csv" in warning
    assert "add sr3_lightning.callbacks.DomainEval to trainer.callbacks" in warning
    assert "never logged an evaluation" in warning
    text = (out / "report.md").read_text()
    assert "1 finished run(s):" in text and "Left out 2 run(s):" in text
    assert f"- {no_eval}: no DomainEval metrics" in text
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(no_eval), str(bare), "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "none of the 2 run(s) has evaluation metrics" in err
    assert str(no_eval) in err and str(bare) in err and not (tmp_path / "none").exists()


def test_report_from_wandb_without_login_says_how_to_log_in(tmp_path, capsys, monkeypatch):
    for name in ("WANDB_API_KEY", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no W&B login
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing leaves this machine
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", "wandb:lab/sr3-finetune", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: report wandb:lab/sr3-finetune")
    assert "`wandb login`" in err and "local run or sweep directories" in err and "Traceback" not in err


class FakeWandbRun:
    """What ``wandb.Api().runs`` yields, for a run whose history holds ``rows``."""

    def __init__(
        self, name: str, state: str, config: dict, rows: list[dict], job_type: str = "train"
    ) -> None:
        self.name, self.state, self.path = name, state, ["lab", "sr3-finetune", f"id-{name}"]
        self.job_type = job_type
        self.config, self.summary, self._rows = {"config": config}, {"_runtime": 12.5}, rows

    def scan_history(self) -> list[dict]:
        return self._rows


def test_report_from_wandb_reads_finished_runs_and_names_the_others(tmp_path, monkeypatch, capsys):
    """The W&B path maps each server run (config as logged by ``fit``, history keyed by the trainer's step)
    onto the same tables as a run directory; running and crashed runs are left out by name."""
    import wandb

    run_dir = write_run(tmp_path / "local", "l1")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    with (run_dir / "metrics.csv").open() as f:
        rows = [
            {("trainer/global_step" if k == "step" else k): float(v) for k, v in r.items() if v}
            for r in csv.DictReader(f)
        ]
    runs = [
        FakeWandbRun("l1", "finished", config, rows),
        FakeWandbRun("l2", "crashed", config | {"model": config["model"] | {"loss": "l2"}}, rows),
        FakeWandbRun("l1-again", "running", config, rows[:2]),
        FakeWandbRun("l1-test", "finished", config, rows[-1:], job_type="test"),  # `test` of a checkpoint
    ]
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"runs": lambda self, path: runs})())
    out = tmp_path / "from_wandb"
    cli_main(["report", "wandb:lab/sr3-finetune", "--out", str(out)])
    shutil.copytree(run_dir, tmp_path / "local" / "pretrained" / "test")  # `test` of init_from weights
    cli_main(["report", str(tmp_path / "local"), "--out", str(tmp_path / "from_dir")])
    text = (out / "report.md").read_text()
    assert "1 finished run(s):" in text and "Left out 2 run(s):" in text
    assert "wandb:lab/sr3-finetune/id-l2 (l2): crashed, not finished" in text
    assert "wandb:lab/sr3-finetune/id-l1-again (l1-again): running, not finished" in text
    tables = [
        (d / "report.md").read_text().split("## Table 1")[1].split("\n## ")[0]
        for d in (out, tmp_path / "from_dir")
    ]
    assert tables[0] == tables[1] and str(round(value("l1", 2000, "anime", "psnr"), 2)) in tables[0]
    runs[0].state = "failed"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", "wandb:lab/sr3-finetune", "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no finished runs under wandb:lab/sr3-finetune" in err
    assert "(read as ENTITY/PROJECT; a sweep is wandb:ENTITY/PROJECT/SWEEP_ID)" in err  # not PROJECT/SWEEP
    assert "id-l1 (l1): failed, not finished" in err and not (tmp_path / "none").exists()
