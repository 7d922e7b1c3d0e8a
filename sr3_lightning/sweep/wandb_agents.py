"""W&B backend: create (or join) a sweep on the W&B server and start one ``wandb agent`` per GPU.

Each agent asks the server for runs and executes the sweep's command with ``CUDA_VISIBLE_DEVICES`` set to
its GPU; several machines join the same sweep id. Signals reach the agents (which forward them to their
runs); an agent that stops is reported with the command that rejoins it, never restarted behind your back.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr3_lightning.sweep.spec import Sweep

log = logging.getLogger(__name__)

POLL_S = 1.0


@dataclass(frozen=True)
class Agent:
    """One ``wandb agent`` process to start: its GPU, command line and environment."""

    device: str | None
    argv: list[str]
    env: dict[str, str]


def create_sweep(sweep: Sweep, project: str, entity: str | None) -> str:
    """Register the sweep on the W&B server; returns its id."""
    import wandb

    return wandb.sweep(sweep.config, project=project, entity=entity)


def sweep_url(sweep_id: str, project: str, entity: str | None) -> str:
    """The sweep's dashboard address (asked from the server; a failure here must not stop the agents)."""
    import wandb

    try:
        api = wandb.Api()
        return api.sweep(f"{entity or api.default_entity}/{project}/{sweep_id}").url
    except Exception as err:  # network and API errors come as many types
        return f"(dashboard address unavailable: {err})"


def agent_processes(
    sweep_id: str,
    devices: list[str] | None,
    *,
    project: str,
    entity: str | None,
    count: int | None,
    sweep_dir: Path,
) -> list[Agent]:
    """One agent per device (one agent on the default device when ``devices`` is None).

    The agents run under this interpreter and put it first on PATH, so ``python`` in the sweep command is
    the same environment; SR3_SWEEP_DIR tells the command where run directories go.
    """
    argv = [sys.executable, "-m", "wandb", "agent", "--forward-signals", "--project", project]
    argv += ["--entity", entity] if entity else []
    argv += ["--count", str(count)] if count is not None else []
    argv.append(sweep_id)
    base = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "SR3_SWEEP_DIR": str(sweep_dir),
    }
    base.pop("WANDB_SERVICE", None)  # an agent and its runs start their own W&B service, never ours
    if devices is None:
        return [Agent(None, argv, base)]
    return [Agent(device, list(argv), {**base, "CUDA_VISIBLE_DEVICES": device}) for device in devices]


def run_agents(agents: list[Agent], rejoin: str) -> int:
    """Start the agents, forward SIGINT/SIGTERM to them, wait for all; returns the worst exit code.

    rejoin: the command line (without --gpus) that starts an agent for this sweep again, for the message
    shown when an agent stops with an error.
    """
    procs = {}
    for agent in agents:
        procs[agent.device] = subprocess.Popen(agent.argv, env=agent.env)
        log.info("agent on %s started (pid %d)", _where(agent.device), procs[agent.device].pid)

    def forward(signum: int, frame: Any) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    worst = 0
    try:
        waiting = dict(procs)
        while waiting:
            time.sleep(POLL_S)
            for device, proc in list(waiting.items()):
                code = proc.poll()
                if code is None:
                    continue
                del waiting[device]
                if code == 0:
                    log.info("agent on %s finished", _where(device))
                    continue
                worst = max(worst, code if code > 0 else 128 - code)
                gpus = f" --gpus {device}" if device is not None else ""
                log.error(
                    "agent on %s exited with code %d and was not restarted; rejoin with: %s%s",
                    _where(device),
                    code,
                    rejoin,
                    gpus,
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return worst


def _where(device: str | None) -> str:
    return "the default device" if device is None else f"GPU {device}"
