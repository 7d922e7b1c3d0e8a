"""SampleGrid: super-resolve a fixed set of val images per domain and log LR | bicubic | SR | HR grids.

Also home of the val-data access and PNG helpers that `DomainEval` shares, since both read the same
fixed val images and write into the same run directory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from sr3_lightning.metrics import to_uint8
from sr3_lightning.models.eval_mode import eval_mode

log = logging.getLogger(__name__)

GRID_COLUMNS = "LR (nearest) | bicubic | SR | HR"


# --------------------------------------------------------------------------- helpers shared with DomainEval
def val_domains(trainer: Trainer) -> list[tuple[str, Iterable[dict[str, Any]]]]:
    """(domain name, loader) per val domain, in the datamodule's order.

    Prefers ``trainer.datamodule`` (``val_domain_names`` + ``val_dataloader()``); without one, falls back to
    the val loaders given to ``fit`` and names each domain by its first batch's ``domain`` field. Loaders
    are fresh and unsharded: rank zero sees every val image.
    """
    dm = trainer.datamodule
    if dm is not None and is_overridden("val_dataloader", dm):
        loaders = dm.val_dataloader()
        loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
        names = list(getattr(dm, "val_domain_names", []))
        names = names or [_first_domain(dl, i) for i, dl in enumerate(loaders)]
        if len(names) != len(loaders):
            raise ValueError(f"datamodule has {len(names)} val_domain_names but {len(loaders)} val loaders")
        return list(zip(names, loaders))
    # Loaders passed to fit() (or the module's val_dataloader hook), read from the source Lightning keeps:
    # `trainer.val_dataloaders` is only filled once validation has run, and is re-sharded under DDP.
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    loaders = source.dataloader() if source is not None and source.is_defined() else None
    if loaders is None:
        raise RuntimeError(
            "sample/eval callbacks need validation data: attach an SR3DataModule (trainer.fit(model, "
            "datamodule=...)) or pass val_dataloaders to fit"
        )
    if isinstance(loaders, dict):  # {domain: loader}
        return [(str(name), dl) for name, dl in loaders.items()]
    loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
    return [(_first_domain(dl, i), dl) for i, dl in enumerate(loaders)]


def _first_domain(loader: Iterable[dict[str, Any]], index: int) -> str:
    batch = next(iter(loader), None)
    domain = batch.get("domain") if isinstance(batch, dict) else None
    if isinstance(domain, list | tuple) and domain:
        return str(domain[0])
    return str(domain) if isinstance(domain, str) else f"domain{index}"


def run_dir(trainer: Trainer) -> Path:
    """Where grids and tables go: the logger's run directory, else ``default_root_dir``.

    ``trainer.log_dir`` broadcasts, so call this on every rank (we do it in ``setup``).
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def to_png(images: Tensor, path: Path, nrow: int) -> np.ndarray:
    """Tile ``[N, 3, H, W]`` images in [-1, 1], ``nrow`` per row, save as PNG; returns the HWC uint8 grid."""
    grid = to_uint8(
        make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0)
    )
    array = grid.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def log_wandb_image(
    trainer: Trainer, key: str, image: np.ndarray, caption: str, step: int | None = None
) -> None:
    """Send one image to every W&B logger at ``step`` (default: the global step); other loggers cannot
    take images."""
    step = trainer.global_step if step is None else step
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key=key, images=[image], step=step, caption=[caption])


# ------------------------------------------------------------------------------------------------ SampleGrid
class SampleGrid(Callback):
    """Every N steps (and before the first update, and at the end) draw SR samples for fixed val images.

    One grid per val domain, one row per image, columns LR (nearest-upsampled, so its pixels show) | bicubic
    (``lr_up``, the network's input) | SR | HR. Noise comes from a generator reseeded with ``seed`` at each
    call, so grids at different steps differ only by the weights. Grids go to W&B as ``samples/{domain}``
    and always to ``{run_dir}/grids/{domain}_step{global_step:06d}.png``. Rank zero only.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_images: int = 4,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        steps: int | None = 100,
        eta: float = 0.0,
        seed: int = 0,
        intermediates: int = 0,
    ) -> None:
        """
        Args:
            every_n_steps: draw a grid when ``global_step`` is a multiple of this (plus step 0 and the end).
            num_images: first N val images of each domain (the val list is fixed, so always the same ones).
            sampler: ``ddpm`` (ancestral, the reference) or ``ddim``.
            steps: K, respace the chain to K steps (fewer = faster previews); None runs all T steps.
            eta: DDIM noise scale (0 = deterministic); ignored by ``ddpm``.
            seed: seed of the sampling noise, the same at every step so grids are comparable.
            intermediates: also save a strip of this many chain states (noisy -> clean, the last is the SR)
                then HR, for the first image, as ``{run_dir}/grids/{domain}_chain_step{step:06d}.png`` and
                W&B ``samples/{domain}_chain``. 0 = off; the regression objective has no chain.
        """
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: use a positive number of optimizer steps")
        if num_images < 1:
            raise ValueError(f"num_images={num_images}: draw at least one image per domain")
        if steps is not None and steps < 1:
            raise ValueError(f"steps={steps}: use a positive number of sampling steps, or null for all T")
        if intermediates < 0:
            raise ValueError(f"intermediates={intermediates}: use 0 (off) or a positive number of states")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.seed = seed
        self.intermediates = intermediates
        self._images: dict[str, dict[str, Tensor]] | None = None  # domain -> {"lr", "lr_up", "hr"} on CPU
        self._done_steps: set[int] = set()
        self._run_dir: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, sampler=self.sampler, steps=self.steps
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._run_dir = run_dir(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._draw(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._draw(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._draw(trainer, pl_module)

    def _fixed_images(self, trainer: Trainer) -> dict[str, dict[str, Tensor]]:
        if self._images is None:
            self._images = {}
            for domain, loader in val_domains(trainer):
                parts: dict[str, list[Tensor]] = {"lr": [], "lr_up": [], "hr": []}
                for batch in loader:
                    for k in parts:
                        parts[k].append(batch[k])
                    if sum(len(t) for t in parts["hr"]) >= self.num_images:
                        break
                if not parts["hr"]:
                    raise ValueError(f"val domain '{domain}' has no images to draw samples for")
                self._images[domain] = {k: torch.cat(v)[: self.num_images] for k, v in parts.items()}
        return self._images

    @torch.no_grad()
    def _draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step in self._done_steps:
            return
        self._done_steps.add(step)
        with eval_mode(pl_module):
            for domain, images in self._fixed_images(trainer).items():
                self._draw_domain(trainer, pl_module, domain, images, step)

    def _draw_domain(
        self, trainer: Trainer, pl_module: LightningModule, domain: str, images: dict[str, Tensor], step: int
    ) -> None:
        device = pl_module.device
        lr, lr_up, hr = (images[k].to(device) for k in ("lr", "lr_up", "hr"))
        gen = torch.Generator(device=device).manual_seed(self.seed)
        record = self._record_steps(pl_module)
        result = pl_module.super_resolve(
            lr_up, sampler=self.sampler, steps=self.steps, eta=self.eta, generator=gen, record=record
        )
        lr_big = F.interpolate(lr, size=hr.shape[-2:], mode="nearest")
        rows = torch.stack([lr_big, lr_up, result.images, hr], dim=1).flatten(0, 1)  # [N*4, 3, H, W]
        assert self._run_dir is not None, "setup() sets the run directory"
        grid = to_png(rows, self._run_dir / "grids" / f"{domain}_step{step:06d}.png", nrow=4)
        log_wandb_image(trainer, f"samples/{domain}", grid, GRID_COLUMNS)
        if result.intermediates:
            chain = torch.stack([x[0] for x in result.intermediates] + [hr[0]])
            strip = to_png(chain, self._run_dir / "grids" / f"{domain}_chain_step{step:06d}.png", len(chain))
            caption = f"state after chain steps {result.recorded_steps} (0-based; 0 = the SR) | HR"
            log_wandb_image(trainer, f"samples/{domain}_chain", strip, caption)

    def _record_steps(self, pl_module: LightningModule) -> list[int] | None:
        """``intermediates`` 0-based chain indices spread evenly from the first step (K-1) to the last (0)."""
        if not self.intermediates or getattr(pl_module.hparams, "objective", "diffusion") == "regression":
            return None
        k = self.steps or pl_module.schedule.num_timesteps
        return sorted({round(v) for v in np.linspace(k - 1, 0, self.intermediates)}, reverse=True)
