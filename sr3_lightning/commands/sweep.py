"""``sweep``: run a study's sweep file as W&B agents (one per GPU) or locally without a W&B server.

    python -m sr3_lightning sweep sweeps/steps.yaml --backend wandb --gpus 0,1,2,3
    python -m sr3_lightning sweep sweeps/steps.yaml --sweep-id ID --gpus 0,1      # another machine joins
    python -m sr3_lightning sweep sweeps/steps.yaml --backend local --gpus 0,1    # no W&B server
    python -m sr3_lightning sweep sweeps/steps.yaml --check                       # validate only

The sweep file and every parameter combination are checked against ``fit`` (its parser and the value checks
of the model, data module and callbacks), and each run's checkpoint and shard indexes are looked up, before
anything starts.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from jsonargparse import ArgumentParser

from sr3_lightning.commands import command_parser
from sr3_lightning.sweep import local, wandb_agents
from sr3_lightning.sweep.spec import check_parameters, load_sweep
from sr3_lightning.tracking import has_wandb_credentials

log = logging.getLogger(__name__)


def parser() -> ArgumentParser:
    p = command_parser("sweep", __doc__)
    p.add_argument("sweep", type=Path, help="a W&B sweep YAML (sweeps/*.yaml)")
    p.add_argument("--backend", choices=["wandb", "local"], default="wandb")
    p.add_argument(
        "--gpus",
        type=str | None,
        default=None,
        help="GPU ids, e.g. 0,1,2,3: one agent (wandb) or one concurrent run (local) per GPU; "
        "default: one agent / runs one after another on the default device",
    )
    p.add_argument("--count", type=int | None, default=None, help="at most N runs per agent / this launch")
    p.add_argument("--project", type=str | None, default=None, help="W&B project (default: tracking.project)")
    p.add_argument("--entity", type=str | None, default=None, help="W&B entity (default: yours)")
    p.add_argument(
        "--sweep-id", type=str | None, default=None, help="join this W&B sweep instead of creating one"
    )
    p.add_argument(
        "--dir", type=Path | None, default=None, help="run directories go to DIR/<run id> (runs/<sweep>)"
    )
    p.add_argument("--check", action="store_true", help="validate the sweep against fit, then exit")
    return p


def parse_gpus(text: str | None) -> list[str] | None:
    """``0,1`` -> the CUDA_VISIBLE_DEVICES value of each run/agent; ValueError for a GPU that does not exist.

    Ids count the GPUs this process sees, so they respect an outer CUDA_VISIBLE_DEVICES.
    """
    if text is None:
        return None
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpus {text}: use comma-separated GPU ids, e.g. --gpus 0,1,2,3") from None
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {text}: list each GPU id once, e.g. --gpus 0,1,2,3")
    import torch

    n = torch.cuda.device_count()
    missing = [i for i in ids if not 0 <= i < n]
    if missing:
        have = f"GPUs 0-{n - 1}" if n else "no CUDA GPU; leave out --gpus to run on the CPU"
        raise ValueError(f"--gpus {text}: GPU {missing[0]} does not exist (this machine has {have})")
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d.strip() for d in outer.split(",")] if outer else [str(i) for i in range(n)]
    return [visible[i] for i in ids]


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    sweep = load_sweep(args.sweep)
    devices = parse_gpus(args.gpus)
    if args.backend == "wandb" and not args.check and not has_wandb_credentials():
        raise ValueError(
            "the wandb backend needs a W&B server login (`wandb login` or WANDB_API_KEY); "
            "without a server, run the same sweep with --backend local"
        )
    cfg = check_parameters(sweep)
    log.info(
        "%s: a valid %s sweep; fit, the model, the data module and the callbacks accept every parameter "
        "combination, and every run's init_from checkpoint and shard indexes are in place",
        sweep.path,
        sweep.method,
    )
    if args.check:
        return
    sweep_dir = args.dir or Path("runs") / sweep.name
    if args.backend == "local":
        ended = local.run_local(sweep, sweep_dir, devices, args.count)
        if any(r["state"] == "failed" for r in ended):
            raise SystemExit(1)
        return
    project = args.project or cfg.tracking.project
    sweep_id = args.sweep_id or wandb_agents.create_sweep(sweep, project, args.entity)
    log.info("sweep %s: %s", sweep_id, wandb_agents.sweep_url(sweep_id, project, args.entity))
    rejoin = shlex.join(
        [
            "python",
            "-m",
            "sr3_lightning",
            "sweep",
            str(sweep.path),
            "--sweep-id",
            sweep_id,
            "--project",
            project,
        ]
        + (["--entity", args.entity] if args.entity else [])
    )
    log.info("other machines join with: %s --gpus ...", rejoin)
    agents = wandb_agents.agent_processes(
        sweep_id, devices, project=project, entity=args.entity, count=args.count, sweep_dir=sweep_dir
    )
    code = wandb_agents.run_agents(agents, rejoin)
    if code:
        raise SystemExit(code)
