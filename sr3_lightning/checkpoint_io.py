"""Crash-safe checkpoints: atomic writes, and picking the newest checkpoint that actually loads.

A run killed at any moment (SIGKILL, preemption, a full disk) leaves either the old checkpoint or the
new one, never a torn file: the bytes go to ``<name>.tmp``, are fsync'd, then renamed over the target.
"""

from __future__ import annotations

import logging
import os
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


def read_checkpoint(path: Path) -> tuple[dict | None, str | None]:
    """(checkpoint, None) for a complete Lightning checkpoint (memory-mapped), else (None, why not)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated zip, foreign file, unpickling error
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return None, "not a Lightning checkpoint (no state_dict / global_step)"
    return ckpt, None


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The loadable checkpoint in ``run_dir/checkpoints`` with the highest step (``last*.ckpt`` on a tie).

    By the step saved inside, not by name: in a run directory that was moved or renamed, Lightning writes
    ``last-v1.ckpt`` beside the old ``last.ckpt``, which then holds an earlier step. Corrupt or truncated
    files are reported by name and skipped, so a crash while writing costs at most the steps since the
    previous checkpoint.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    best: tuple[tuple[int, bool, float], Path] | None = None
    for path in sorted(folder.glob("*.ckpt")):
        ckpt, problem = read_checkpoint(path)  # memory-mapped: the weights are not read
        if ckpt is None:
            log.warning("checkpoint %s is corrupt (%s); skipped", path, problem)
            continue
        rank = (int(ckpt["global_step"]), path.name.startswith("last"), path.stat().st_mtime)
        if best is None or rank > best[0]:
            best = (rank, path)
    return best[1] if best else None
