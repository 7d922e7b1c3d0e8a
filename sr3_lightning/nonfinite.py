"""Skip optimizer steps whose gradients are not finite, and stop a run that keeps producing them.

A diverging fine-tune (too high a learning rate, a broken image) yields NaN/inf gradients; one bad step
must not poison the weights, and many in a row must stop the run with the step and the batch to look at.

With fused Adam/AdamW (the default on CUDA and CPU), whose step honours ``found_inf``, the whole guard
stays on the device: the fused kernel skips the update itself and the counters are tensors,
read back once per ``trainer.log_every_n_steps`` (no host-device synchronisation per step). Any other
optimizer gets the same behaviour by reading one bool per step and dropping the gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def all_finite(tensors: Iterable[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: True when every element of every tensor is finite.

    One pass of the grad scaler's own check (a single fused kernel per dtype on CUDA; on the CPU 7x faster
    than an inf-norm per tensor). Its unscale multiplies by exactly 1, so the values are left as they are.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    if not groups:
        return torch.tensor(True)
    devices = {device for device, _ in groups}
    if len(devices) > 1:
        raise ValueError(f"all_finite checks tensors on one device; got {sorted(map(str, devices))}")
    device = devices.pop()
    found = torch.zeros((), device=device)
    one = torch.ones((), device=device)
    for group in groups.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)  # found = 1 on any NaN / inf
    return found == 0


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for fused Adam/AdamW: given ``optimizer.found_inf`` = 1 their kernel leaves weights, moments and
    the step count untouched. (Fused SGD would leave a first step's momentum uninitialised: host path.)"""
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and fused


class NonFiniteGuard:
    """Counts skipped steps; raises FloatingPointError after ``patience`` consecutive ones."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"nonfinite_patience={patience}: use 1 or more (1 stops at the first bad step)")
        self.patience = patience
        self._device: torch.device | None = None
        # consecutive bad steps, the most of them, skipped in all, last bad step, step the patience ran out
        self._counts: Tensor | None = None
        self._keys: dict[int, list[str]] = {}  # batch keys per step since the last check
        self._reported_skips = 0

    def step(
        self, optimizer: torch.optim.Optimizer, grads: list[Tensor], step: int, keys: list[str]
    ) -> Tensor:
        """Call after backward, before ``optimizer.step``; returns the 0-dim bool "this step is finite"."""
        finite = all_finite(grads)
        self._keys[step] = keys
        if skips_on_device(optimizer):
            optimizer.found_inf = (~finite).float()  # the fused kernel leaves weights and moments untouched
            self._count(finite, step)
            return finite
        self._count(finite, step)
        if not bool(finite):  # one read per step: optimizers without found_inf must be told on the host
            optimizer.zero_grad(set_to_none=True)  # Adam/SGD then update nothing
            self.check()
        return finite

    def _count(self, finite: Tensor, step: int) -> None:
        if self._counts is None or self._device != finite.device:
            self._device = finite.device
            self._counts = torch.tensor([0, 0, 0, -1, -1], device=finite.device)
        run, worst, skipped, last_bad, tripped = self._counts.unbind()
        bad = (~finite).long()
        run = (run + 1) * bad
        tripped = torch.where((tripped < 0) & (run >= self.patience), step, tripped)
        self._counts = torch.stack(
            [run, torch.maximum(worst, run), skipped + bad, torch.where(finite, last_bad, step), tripped]
        )

    @property
    def skipped(self) -> Tensor:
        """Total skipped steps as a tensor (log it without reading it back)."""
        return self._counts[2].float() if self._counts is not None else torch.tensor(0.0)

    def check(self) -> None:
        """Read the counters back (one synchronisation): warn about skipped steps, raise past the patience."""
        if self._counts is None:
            return
        _, worst, skipped, last_bad, tripped = self._counts.tolist()
        if skipped > self._reported_skips:
            log.warning(
                "%d step(s) skipped for non-finite gradients so far; the last at step %d (batch keys %s)",
                skipped,
                last_bad,
                self._keys.get(last_bad, "?"),
            )
            self._reported_skips = skipped
        if worst >= self.patience:
            raise FloatingPointError(
                f"{self.patience} consecutive steps with non-finite loss or gradients, the last at step "
                f"{tripped} on batch keys {self._keys.get(tripped, '?')}. Lower the learning rate, check "
                "these images, or raise model.nonfinite_patience."
            )
        self._keys = {last_bad: self._keys[last_bad]} if last_bad in self._keys else {}
