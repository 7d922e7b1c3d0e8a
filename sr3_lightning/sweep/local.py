"""Local backend: run a sweep without a W&B server, choosing runs with W&B's own sweep engine.

The ``sweeps`` package (the engine behind W&B's sweep server) proposes each next run from the sweep YAML and
the runs so far (grid, random or bayes). Each run executes the sweep's command exactly as ``wandb agent``
builds it (same macros, same ``--key=value`` flags), one per GPU or one after another, with W&B offline
beside the CSV log. Finished runs are appended to ``SWEEP_DIR/runs.jsonl``; a relaunch skips them and redoes
any run that was cut off (from its last checkpoint, since ``fit`` resumes by default), so a killed
sweep resumes where it stopped.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sr3_lightning.sweep.spec import Sweep, expand_envvars, parameter_flags, sweep_engine

log = logging.getLogger(__name__)

RECORDS = "runs.jsonl"  # one JSON object per ended run: run_id, params, state, exit_code, seconds, ...
POLL_S = 0.5
STOP_GRACE_S = 60  # after a stop signal, runs get this long to exit before they are killed


def run_id_for(params: dict[str, Any]) -> str:
    """A readable, stable id for a parameter set (also the W&B run id and the run directory's name)."""
    slug = "-".join(_slug(v) for v in params.values())[:48].strip("-") or "run"
    digest = hashlib.md5(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{slug}-{digest}"


def _slug(value: Any) -> str:
    if isinstance(value, dict):
        return "-".join(f"{k.split('.')[-1]}{_slug(v)}" for k, v in value.items())
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(value))


def build_command(sweep: Sweep, params: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` runs for these parameters, with ``python`` = this interpreter."""
    macros = {
        "${env}": ["/usr/bin/env"],
        "${interpreter}": [sys.executable],
        "${program}": [str(sweep.config.get("program", ""))],
        "${args}": parameter_flags(params),
    }
    out: list[str] = []
    for chunk in expand_envvars([str(c) for c in sweep.config["command"]]):
        if chunk in macros:
            out += macros[chunk]
        elif chunk.startswith("${") and chunk.endswith("}"):
            raise ValueError(
                f"{sweep.path}: the local backend does not support the {chunk} macro; use ${{args}}"
            )
        else:
            out.append(sys.executable if chunk == "python" else chunk)
    return out


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Ended runs recorded in ``sweep_dir/runs.jsonl`` (a line cut off by a crash is ignored)."""
    path = Path(sweep_dir) / RECORDS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: ignoring an incomplete line", path)
    return records


def latest_records(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Each recorded run's latest record, by run id: a retried or redone run counts as it last ended."""
    return {r["run_id"]: r for r in read_records(sweep_dir)}


def _append_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    with (sweep_dir / RECORDS).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _claim(sweep_dir: Path, sweep: Sweep) -> None:
    """Keep a copy of the sweep in its directory; refuse to resume a directory started by another sweep,
    unless the sweep is its grid with values added (`grid_extension`): then the new points run there."""
    copy = sweep_dir / "sweep.yaml"
    if copy.is_file():
        before = yaml.safe_load(copy.read_text())
        if _canonical(before) == _canonical(sweep.config):
            return
        added = grid_extension(before, sweep.config)
        if added is None:
            raise ValueError(
                f"{sweep_dir} holds runs of a different sweep (see {copy}); only a grid whose parameters "
                f"gain values extends it in place. Pass another --dir (e.g. {sweep_dir}_2) and report both "
                f"directories together (python -m sr3_lightning report {sweep_dir} {sweep_dir}_2 --out ...), "
                "or delete it"
            )
        if added:
            log.warning(
                "extending the grid of %s: %s; its finished runs are kept", sweep_dir, "; ".join(added)
            )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(sweep.config, sort_keys=False))


def _canonical(value: Any) -> str:
    """A sweep config as JSON: ``1``, ``1.0`` and ``true`` are three values here, as in the runs' flags."""
    return json.dumps(value, sort_keys=True, default=str)


def _values(spec: Any) -> list[str] | None:
    """A grid parameter's values (canonical), for ``values: [...]`` and ``value: x``; None for others."""
    if isinstance(spec, dict) and set(spec) == {"values"} and isinstance(spec["values"], list):
        return [_canonical(v) for v in spec["values"]]
    if isinstance(spec, dict) and set(spec) == {"value"}:
        return [_canonical(spec["value"])]
    return None


def grid_extension(before: dict[str, Any], after: dict[str, Any]) -> list[str] | None:
    """What ``after`` adds to the grid ``before`` (``PARAM += [values]`` each), when adding values to its
    parameters is all that changed; None otherwise. Run ids come from the parameters, so the runs already
    finished keep their directories and only the new points run."""
    rest = [_canonical({k: v for k, v in c.items() if k != "parameters"}) for c in (before, after)]
    params = [c.get("parameters") or {} for c in (before, after)]
    if before.get("method") != "grid" or rest[0] != rest[1] or set(params[0]) != set(params[1]):
        return None
    added = []
    for name, spec in params[0].items():
        if _canonical(spec) == _canonical(params[1][name]):
            continue
        old, new = _values(spec), _values(params[1][name])
        if old is None or new is None or not set(old) <= set(new):
            return None
        if set(new) - set(old):
            added.append(f"{name} += [{', '.join(v for v in new if v not in old)}]")
    return added


def _last_value(run_dir: Path, name: str) -> float | None:
    """The last logged value of a metric in ``run_dir/metrics.csv`` (what the sweep optimises)."""
    value = None
    path = run_dir / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get(name):
                    value = float(row[name])
    return value


@dataclass
class _Trial:
    run_id: str
    params: dict[str, Any]
    device: str | None
    proc: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop then stops starting runs and ends the running ones."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


class _Launch:
    """The runs of one launch: asks the engine for the next run whenever a device slot is free, records
    each run that ends, and tells the engine about them, so its next suggestions account for them."""

    def __init__(self, sweep: Sweep, sweep_dir: Path, finished: list[dict[str, Any]], count: int | None):
        self.sweep, self.sweep_dir, self.count = sweep, sweep_dir, count
        self.metric = (sweep.config.get("metric") or {}).get("name")
        self.engine = sweep_engine()
        self.known = [self.as_run(r, "finished") for r in finished]
        self.running: dict[str | None, _Trial] = {}
        self.ended: list[dict[str, Any]] = []
        self.started, self.exhausted = 0, False

    def as_run(self, record: dict[str, Any], state: str) -> Any:
        """A run in the engine's terms: its parameters, state and (when finished) the sweep's metric."""
        value = record.get("metric")
        summary = {self.metric: value} if self.metric and value is not None else {}
        config = {k: {"value": v} for k, v in record["params"].items()}
        return self.engine.SweepRun(
            name=record["run_id"], config=config, state=state, summary_metrics=summary
        )

    def fill(self, slots: list[str | None]) -> None:
        """Start the engine's next run on every free slot, until it has none or ``count`` are started."""
        for slot in slots:
            if (
                slot in self.running
                or self.exhausted
                or (self.count is not None and self.started >= self.count)
            ):
                continue
            busy = [
                self.as_run({"run_id": t.run_id, "params": t.params}, "running")
                for t in self.running.values()
            ]
            suggestion = self.engine.next_run(self.sweep.config, self.known + busy)
            if suggestion is None:
                self.exhausted = True
                continue
            params = {k: v["value"] for k, v in suggestion.config.items()}
            taken = {r.name for r in self.known} | {t.run_id for t in self.running.values()}
            self.running[slot] = _start(self.sweep, self.sweep_dir, params, slot, taken)
            self.started += 1

    def reap(self, stopped: bool) -> None:
        """Record the runs that have exited; a run ended by a stop is left to redo on relaunch."""
        for slot, trial in list(self.running.items()):
            code = trial.proc.poll()
            if code is None:
                continue
            del self.running[slot]
            record = _end(self.sweep_dir, trial, code, self.metric, stopped=stopped)
            if record is not None:
                self.ended.append(record)
                self.known.append(self.as_run(record, record["state"]))

    def end_running(self, kill: bool) -> None:
        for trial in self.running.values():
            if kill:
                trial.proc.kill()
            else:
                trial.proc.send_signal(signal.SIGTERM)


def run_local(
    sweep: Sweep, sweep_dir: Path, devices: list[str] | None = None, count: int | None = None
) -> list[dict[str, Any]]:
    """Run the sweep's remaining runs; returns the records of the runs that ended in this launch.

    devices: CUDA_VISIBLE_DEVICES values, one concurrent run each; None runs one at a time on whatever
    device ``fit`` picks. count: start at most this many runs in this launch (needed for random/bayes).
    """
    if sweep.method != "grid" and count is None:
        raise ValueError(f"{sweep.path}: a {sweep.method} sweep never ends by itself; pass --count N")
    sweep_dir = Path(sweep_dir).resolve()
    _claim(sweep_dir, sweep)
    finished = {rid: r for rid, r in latest_records(sweep_dir).items() if r["state"] == "finished"}
    gone = [rid for rid in finished if not (sweep_dir / rid / "config.yaml").is_file()]
    if gone and sweep.method == "grid":  # random and bayes draw new values instead of redoing a run
        log.warning(
            "%s: redoing %d finished run(s) whose directory is gone: %s",
            sweep_dir,
            len(gone),
            ", ".join(gone),
        )
        finished = {rid: r for rid, r in finished.items() if rid not in gone}
    if finished:
        log.info("%s: %d finished run(s) are kept and skipped", sweep_dir, len(finished))
    launch = _Launch(sweep, sweep_dir, list(finished.values()), count)
    slots: list[str | None] = list(devices) if devices else [None]
    stop_since = None
    with _StopFlag() as stop:
        while True:
            if not stop.signum:
                launch.fill(slots)
            if not launch.running:
                break
            time.sleep(POLL_S)
            if stop.signum and stop_since is None:
                stop_since = time.monotonic()
                log.warning(
                    "stopping: ending %d running run(s); they will be redone on relaunch", len(launch.running)
                )
                launch.end_running(kill=False)
            if stop_since is not None and time.monotonic() - stop_since > STOP_GRACE_S:
                launch.end_running(kill=True)
            launch.reap(stopped=stop.signum is not None)
    if stop.signum:
        log.warning("sweep stopped by signal %d; run the same command again to resume", stop.signum)
        raise SystemExit(128 + stop.signum)
    _summarise(sweep_dir, launch.ended, launch.exhausted, sweep.method)
    return launch.ended


def _start(
    sweep: Sweep, sweep_dir: Path, params: dict[str, Any], device: str | None, taken: set[str]
) -> _Trial:
    run_id, n = run_id_for(params), 1
    while run_id in taken:  # random search may propose the same values twice: a new run, not a resume
        n += 1
        run_id = f"{run_id_for(params)}-{n}"
    run_dir = sweep_dir / run_id
    if run_dir.exists():  # cut off by a kill: fit resumes from its checkpoint, or it starts again
        from sr3_lightning.checkpoint_io import find_resume_checkpoint

        if find_resume_checkpoint(run_dir) is None:
            log.warning("redoing %s from the start: it was cut off before its first checkpoint", run_id)
            shutil.rmtree(run_dir)
        else:
            log.warning("continuing %s from its last checkpoint: it was cut off", run_id)
    command = [*build_command(sweep, params), "--tracking.mode=offline", f"--tracking.group={sweep.name}"]
    env = {**os.environ, "WANDB_RUN_ID": run_id, "SR3_SWEEP_DIR": str(sweep_dir), "WANDB_MODE": "offline"}
    env.pop("WANDB_SWEEP_ID", None)  # not an agent run: nothing to report to a server
    env.pop("WANDB_SERVICE", None)  # as `wandb agent` does: each run starts its own W&B service, not ours
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    log_path = sweep_dir / "logs" / f"{run_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as out:  # a continued or retried run keeps the log of its earlier launches
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    where = "CPU/default device" if device is None else f"GPU {device}"
    log.info("start %s on %s: %s (log: %s)", run_id, where, " ".join(parameter_flags(params)), log_path)
    return _Trial(run_id, params, device, proc, log_path)


def _end(
    sweep_dir: Path, trial: _Trial, code: int, metric: str | None, stopped: bool
) -> dict[str, Any] | None:
    """Record a run that ended by itself (finished or failed); a run ended by a stop is left to redo."""
    run_dir = sweep_dir / trial.run_id
    seconds = _add_seconds(run_dir, time.monotonic() - trial.started)
    if stopped:
        log.info("%s ended by the stop (exit %d): not recorded, redone on relaunch", trial.run_id, code)
        return None
    record = {
        "run_id": trial.run_id,
        "params": trial.params,
        "state": "finished" if code == 0 else "failed",
        "exit_code": code,
        "seconds": seconds,
        "device": trial.device,
        "run_dir": str(run_dir),
        "metric": _last_value(run_dir, metric) if metric and code == 0 else None,
    }
    _append_record(sweep_dir, record)
    if code == 0:
        log.info("finished %s in %.0f s", trial.run_id, seconds)
    else:
        tail = "".join(collections.deque(trial.log_path.open(errors="replace"), maxlen=15))
        log.error("FAILED %s (exit %d); last lines of %s:\n%s", trial.run_id, code, trial.log_path, tail)
    return record


def _add_seconds(run_dir: Path, seconds: float) -> float:
    """The run's seconds over all its launches (a run cut off and continued is timed whole, for the
    report's cost table), kept in ``run_dir/seconds.txt``."""
    path = run_dir / "seconds.txt"
    if not run_dir.is_dir():
        return round(seconds, 1)
    total = round(seconds + (float(path.read_text()) if path.is_file() else 0.0), 1)
    path.write_text(f"{total}\n")
    return total


def _summarise(sweep_dir: Path, ended: list[dict[str, Any]], exhausted: bool, method: str) -> None:
    done = {rid for rid, r in latest_records(sweep_dir).items() if r["state"] == "finished"}
    failed = [r["run_id"] for r in ended if r["state"] == "failed"]
    retry = (
        "retried on relaunch" if method == "grid" else f"a relaunch of this {method} sweep draws new values"
    )
    log.info(
        "%s: %d run(s) ended in this launch, %d finished in total%s%s",
        sweep_dir,
        len(ended),
        len(done),
        "; the search space is exhausted" if exhausted else "",
        f"; FAILED ({retry}): {', '.join(failed)}" if failed else "",
    )
