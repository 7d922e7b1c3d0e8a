"""Crash-safe checkpoints: atomic writes, and picking the newest checkpoint that actually loads.

A run killed at any moment (SIGKILL, preemption, a full disk) leaves either the old checkpoint or the
new one, never a torn file: the bytes go to ``<name>.tmp``, are fsync'd, then renamed over the target.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temporary file, fsyncs it and renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        start = time.perf_counter()
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(
                err.errno,
                f"could not write checkpoint {path} ({err.strerror or err}); the previous checkpoint "
                "files are untouched. Free disk space or choose another --trainer.default_root_dir.",
            ) from err
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("saved checkpoint %s in %.2f s", path, time.perf_counter() - start)


def _step_of(path: Path) -> int:
    match = re.search(r"step=(\d+)", path.name)
    return int(match.group(1)) if match else -1


def read_checkpoint(path: Path) -> tuple[dict | None, str | None]:
    """(checkpoint, None) for a complete Lightning checkpoint (memory-mapped), else (None, why not)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated zip, foreign file, unpickling error
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return None, "not a Lightning checkpoint (no state_dict / global_step)"
    return ckpt, None


def is_loadable(path: Path) -> str | None:
    """None when ``path`` is a complete Lightning checkpoint, else why it is not."""
    return read_checkpoint(path)[1]


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest loadable checkpoint in ``run_dir/checkpoints`` (``last.ckpt`` first, then by step).

    Corrupt or truncated files are reported by name and skipped, so a crash while writing costs at most
    the steps since the previous checkpoint.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    candidates = sorted(
        folder.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", _step_of(p), p.stat().st_mtime)
    )
    for path in reversed(candidates):
        problem = is_loadable(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is corrupt (%s); falling back to the previous one", path, problem)
    return None
