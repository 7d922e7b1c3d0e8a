"""SR3Module: wires the UNet, the noise schedule, the loss and the optimizer; the math lives in diffusion/."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from sr3_lightning.diffusion import (
    Generators,
    SampleResult,
    conditional_denoiser,
    denoising_loss,
    gaussian_like,
    make_schedule,
    respace,
    sample_ddim,
    sample_ddpm,
    sample_from_image,
    sample_noise_level,
)
from sr3_lightning.diffusion.losses import check_t_range, regression_loss, regression_predict
from sr3_lightning.diffusion.schedule import REFERENCE_SCHEDULE, BetaSchedule
from sr3_lightning.fast_paths import (
    CompileMode,
    FastPaths,
    check_compile_mode,
    use_fused_adam,
    uses_cuda_graphs,
)
from sr3_lightning.init_weights import load_init_weights, take_over_optimizer_state
from sr3_lightning.models.eval_mode import eval_mode
from sr3_lightning.models.unet import UNet, UNetConfig, init_orthogonal
from sr3_lightning.nonfinite import NonFiniteGuard

log = logging.getLogger(__name__)

Sampler = Literal["ddpm", "ddim"]


def step_seed(seed: int, step: int, rank: int, micro_batch: int = 0) -> int:
    """A distinct 63-bit seed per (seed, step, rank, micro-batch of a gradient-accumulation window): the
    training draws depend on these alone (distinct for steps < 2^27, ranks < 8191)."""
    return (seed * 1_000_003 + step * 8_191 + rank + micro_batch * 2**40) % (2**63 - 1)


_RESTORING: contextvars.ContextVar[bool] = contextvars.ContextVar("sr3_restoring", default=False)


@contextlib.contextmanager
def restoring_from_checkpoint(restoring: bool = True) -> Iterator[None]:
    """Build SR3Modules whose weights a checkpoint replaces next (a resume, validate, sample): their
    ``init_from`` is recorded in hparams but not read."""
    token = _RESTORING.set(restoring)
    try:
        yield
    finally:
        _RESTORING.reset(token)


class SR3Module(LightningModule):
    """SR3 conditional DDPM (or its one-step regression baseline) for training, evaluation and sampling."""

    def __init__(
        self,
        unet: UNetConfig = UNetConfig(),
        beta_schedule: BetaSchedule = REFERENCE_SCHEDULE["kind"],
        num_timesteps: int = REFERENCE_SCHEDULE["num_timesteps"],
        beta_start: float = REFERENCE_SCHEDULE["start"],
        beta_end: float = REFERENCE_SCHEDULE["end"],
        loss: Literal["l1", "l2"] = "l1",
        t_min: int = 1,
        t_max: int | None = None,
        t_sampling: Literal["batch", "sample"] = "batch",
        objective: Literal["diffusion", "regression"] = "diffusion",
        weight_init: Literal["orthogonal", "default"] = "orthogonal",
        ema_decay: float | None = None,
        init_from: str | None = None,
        init_optimizer: bool = True,
        seed: int = 0,
        nonfinite_patience: int = 10,
        channels_last: bool | None = None,
        compile: bool | None = None,
        compile_mode: CompileMode = "default",
        fused_attention: bool = True,
        fused_adam: bool | None = None,
        progress_bar_loss: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            unet: UNet shape; defaults to the reference 16->128 model (64 ch x (1,2,4,8,8), attention at 16).
            beta_schedule: name of the training noise schedule (linear, quad, cosine, warmup10, ...).
            num_timesteps: T, the number of diffusion steps (2000 in the reference).
            beta_start: first beta (``linear_start`` in the reference config).
            beta_end: last beta (``linear_end``).
            loss: ``l1`` (the reference) or ``l2`` on the predicted noise.
            t_min: smallest training step, 1-based; with ``t_max`` restricts training to a timestep range.
            t_max: largest training step (default T).
            t_sampling: one t per batch (the reference) or one per sample.
            objective: ``diffusion`` (SR3) or ``regression`` (one-step baseline with the same UNet).
            weight_init: ``orthogonal`` is the reference's init for training from scratch.
            ema_decay: keep an exponential moving average of the weights for sampling/evaluation (off: None).
            init_from: start from a reference checkpoint (``.../I640000_E37`` = ``_gen.pth`` + ``_opt.pth``)
                or one of our ``.ckpt`` files; resuming our own runs uses ``fit --ckpt_path`` instead.
            init_optimizer: take over the Adam moments and step counts of ``init_from``; lr, betas and
                weight decay stay this run's (False: fresh Adam moments).
            seed: seed of the training draws (t, noise, dropout). Step k on rank r (micro-batch m of a
                gradient-accumulation window) always draws the same numbers, so a resumed run continues
                bit for bit without carrying RNG state.
            nonfinite_patience: a step with non-finite gradients is skipped and counted; this many in a
                row stop the run with the step and the batch keys (checked every
                ``trainer.log_every_n_steps`` with fused Adam, at once with other optimizers).
            channels_last: UNet weights and activations in NHWC (faster convolutions on GPU and CPU).
                None = the fastest for the device (`sr3_lightning.fast_paths.FastPaths.resolve`).
            compile: ``torch.compile`` the UNet in place (keys unchanged). None = on with CUDA, off on CPU.
            compile_mode: ``torch.compile`` mode; ``reduce-overhead`` replays forward and backward as CUDA
                graphs (for launch-bound small batches; not with gradient accumulation).
            fused_attention: attention by fused ``scaled_dot_product_attention``; False = the unfused
                softmax(q k^T) v of the reference (for comparisons).
            fused_adam: use the fused Adam/AdamW kernel. None = on where the parameters' device has it.
            progress_bar_loss: show ``train/loss`` in the progress bar every step; costs one host-device
                synchronisation per step (off: fetched only every ``trainer.log_every_n_steps``).
            optimizer: optimizer factory; default Adam(lr=1e-4), the reference's.
            lr_scheduler: optional learning-rate scheduler factory (the reference uses none).
        """
        super().__init__()
        unet = UNetConfig(**unet) if isinstance(unet, dict) else unet
        self.save_hyperparameters(ignore=["unet", "optimizer", "lr_scheduler"])
        self.hparams["unet"] = unet.to_dict()
        self.schedule = make_schedule(beta_schedule, num_timesteps, beta_start, beta_end)
        self.t_max = num_timesteps if t_max is None else t_max
        check_t_range(t_min, self.t_max, num_timesteps)
        check_compile_mode(compile_mode)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: use a value in (0, 1), e.g. 0.9999, or null to disable")
        self.unet = UNet(unet)
        if weight_init == "orthogonal":
            init_orthogonal(self.unet)
        self._init_optimizer_state: dict | None = None
        if init_from and _RESTORING.get():
            log.info("init_from %s is not read: the checkpoint being restored holds the weights", init_from)
        elif init_from:
            self._initialise_from(init_from, init_optimizer)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False) if ema_decay else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self._guard = NonFiniteGuard(nonfinite_patience)
        self._step_finite: Tensor | None = None  # this step's "gradients are finite", on the device
        self._batch_keys: list[str] = []
        self._restored_step = 0  # validate, test: the step of the checkpoint being evaluated
        self._cuda_graphs = False  # compile_mode replays CUDA graphs (set in setup, once the device is known)
        # The parameter lists the per-step guard and EMA walk, kept for one fit (`_fit_params`):
        # `parameters()` recurses through ~550 modules, about 1 ms of host time per walk.
        self._params: tuple[list[Tensor], list[Tensor]] | None = None

    # ----------------------------------------------------------------------------------------- training
    def _initialise_from(self, init_from: str, init_optimizer: bool) -> None:
        """Start from another model's weights (and Adam state), warning when its noise schedule differs."""
        init = load_init_weights(init_from, self.unet)
        self._init_optimizer_state = init.optimizer_state if init_optimizer else None
        log.info("initialised from %s", init.description)
        if init.schedule_differs(self.schedule):
            hp = self.hparams
            ours = {"kind": hp.beta_schedule, "num_timesteps": hp.num_timesteps}
            ours |= {"start": hp.beta_start, "end": hp.beta_end}
            log.warning(
                "%s was trained on the noise schedule %s; this run uses %s. SR3 conditions on the noise "
                "level, so this works, but if it is not intended set model.beta_schedule, "
                "model.num_timesteps, model.beta_start and model.beta_end to the checkpoint's.",
                init_from,
                init.schedule_spec,
                ours,
            )

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> SR3Module:
        """A trained checkpoint on its own: the ``init_from`` it started from is named in its hparams but
        not read (it may be on another machine, and its weights would be replaced at once)."""
        with restoring_from_checkpoint():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches  # global_step counts optimizer steps
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank, micro_batch))
        self._batch_keys = list(batch.get("key", []))
        self.trainer.callback_metrics.pop("step", None)  # the last validation's: checkpoints name this step
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.batch_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=self.hparams.progress_bar_loss, batch_size=batch["hr"].shape[0])
        return loss

    def batch_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss ``[B]`` of the configured objective on a batch dict (``hr``, ``lr_up``)."""
        hr, cond = batch["hr"], batch["lr_up"]
        if self.hparams.objective == "regression":
            return regression_loss(self.unet, hr, cond, self.hparams.loss)
        sched = self._schedule_on(hr.device)
        _, sqrt_gamma = sample_noise_level(
            sched, hr.shape[0], self.hparams.t_min, self.t_max, self.hparams.t_sampling == "sample", generator
        )
        noise = torch.randn(hr.shape, generator=generator, device=hr.device, dtype=hr.dtype)
        return denoising_loss(self.unet, hr, cond, sqrt_gamma, noise, self.hparams.loss)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log_domain_loss(batch, batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``test`` logs the validation loss too; `DomainEval` adds the super-resolution metrics."""
        self._log_domain_loss(batch, batch_idx)

    def _log_domain_loss(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """``val/{domain}/loss`` with noise and t seeded by the batch index: every evaluation draws alike."""
        gen = torch.Generator(device=batch["hr"].device).manual_seed(batch_idx)
        loss = self.batch_loss(batch, generator=gen).mean()
        domain = batch["domain"][0] if isinstance(batch["domain"], list | tuple) else batch["domain"]
        self.log(
            f"val/{domain}/loss",
            loss,
            batch_size=batch["hr"].shape[0],
            add_dataloader_idx=False,
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        """Log the validation losses at the step of the weights they measure, as `DomainEval` and the
        checkpoints name it: Lightning's default is one step earlier in ``fit`` and 0 in ``validate``.
        (The logged ``step`` stays in ``callback_metrics``, where checkpoint names read it, until the next
        training batch drops it.)"""
        step = self.global_step if self.trainer.state.fn == "fit" else self._restored_step
        self.log("step", float(step), add_dataloader_idx=False, sync_dist=True)  # the row's step

    def on_test_epoch_end(self) -> None:
        """``test`` rows at the step of the weights they measure, as in ``validate``."""
        self.on_validation_epoch_end()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_step = int(checkpoint.get("global_step", 0))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip a step whose gradients are not finite (`sr3_lightning.nonfinite`). Under fp16 the grad
        scaler skips such steps itself (and counts nothing: use bf16 for the patience check)."""
        self._step_finite = None
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self._fit_params()[0] if p.grad is not None]
        if grads:
            self._step_finite = self._guard.step(optimizer, grads, self.global_step, self._batch_keys)
        self.log("train/skipped_steps", self._guard.skipped)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA of the new weights: once per step (also when accumulating),
        and before callbacks such as ModelCheckpoint see the step."""
        super().optimizer_step(*args, **kwargs)
        if self.ema_unet is not None:
            self._update_ema()
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:
            self._guard.check()

    @torch.no_grad()
    def _update_ema(self) -> None:
        rate = 1.0 - self.hparams.ema_decay
        if self._step_finite is not None:  # 0 on a skipped step; a tensor on the device (no sync)
            rate = self._step_finite * rate
        params, ema_params = self._fit_params()
        torch._foreach_lerp_(ema_params, params, rate)

    def _fit_params(self) -> tuple[list[Tensor], list[Tensor]]:
        """The UNet's and the EMA's parameter lists, listed once per fit (dropped in on_train_end)."""
        if self._params is None:
            ema = list(self.ema_unet.parameters()) if self.ema_unet is not None else []
            self._params = (list(self.unet.parameters()), ema)
        return self._params

    def on_train_end(self) -> None:
        self._guard.check()
        self._params = None

    def configure_optimizers(self):
        params = self.unet.parameters()
        opt = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.Adam(params, lr=1e-4)
        if self.scheduler_factory is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"},
        }

    def setup(self, stage: str) -> None:
        hp = self.hparams
        device = self.trainer.strategy.root_device
        mode = hp.get("compile_mode", "default")
        paths = FastPaths.resolve(
            device, hp.channels_last, hp.compile, hp.fused_attention, hp.fused_adam, mode
        )
        graphs = paths.compile and uses_cuda_graphs(mode)  # on CUDA; checked on any device alike
        self._cuda_graphs = graphs and device.type == "cuda"
        if graphs and stage == "fit" and self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"model.compile_mode={mode} (CUDA graphs) cannot accumulate gradients over "
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} batches: raise "
                "data.batch_size instead, or use model.compile_mode=default"
            )
        for unet in (self.unet, self.ema_unet):
            if unet is not None:
                paths.apply(unet)
        self._params = None

    def on_train_start(self) -> None:
        hp = self.hparams
        if FastPaths.resolve(self.device, fused_adam=hp.fused_adam).fused_adam:
            use_fused_adam(self.trainer.optimizers)  # after any optimizer state was loaded

    def on_fit_start(self) -> None:
        if self._init_optimizer_state is not None and self.trainer.ckpt_path is None:
            source, state = self.hparams.init_from, self._init_optimizer_state
            differed = take_over_optimizer_state(self.trainer.optimizers[0], state, source)
            kept = f"; kept the configured {', '.join(sorted(set(differed)))}" if differed else ""
            log.info("took over the optimizer state (moments, step counts) of %s%s", source, kept)
        self._init_optimizer_state = None

    # ----------------------------------------------------------------------------------------- sampling
    def _schedule_on(self, device: torch.device):
        if self.schedule.device != device:
            self.schedule = self.schedule.to(device)
        return self.schedule

    @property
    def sampling_unet(self) -> UNet:
        """The EMA weights when kept, else the trained ones."""
        return self.ema_unet if self.ema_unet is not None else self.unet

    @torch.no_grad()
    def super_resolve(
        self,
        lr_up: Tensor,
        sampler: Sampler = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        t_start: int | None = None,
        generator: Generators = None,
        record: list[int] | None = None,
        progress: bool = False,
    ) -> SampleResult:
        """Super-resolve bicubic upsamples ``[B, 3, H, W]`` in [-1, 1].

        ``steps`` respaces the chain to K steps (default: all T). ``t_start`` (1-based, in the possibly
        respaced schedule) starts from the noised ``lr_up`` instead of pure noise (Diff-SR / SDEdit).
        The regression objective answers with one forward pass. ``generator`` may be one per image.
        """
        if self.hparams.objective == "regression":
            with eval_mode(self.sampling_unet) as unet:
                return SampleResult(images=regression_predict(unet, lr_up), nfe=1)
        sched = self._schedule_on(lr_up.device)
        if steps is not None and steps != sched.num_timesteps:
            sched = respace(sched, steps)
        with eval_mode(self.sampling_unet) as unet:
            denoise = conditional_denoiser(unet, lr_up)
            common = dict(generator=generator, record=record, progress=progress)
            if t_start is not None:
                return sample_from_image(denoise, lr_up, sched, t_start, sampler=sampler, eta=eta, **common)
            x_t = gaussian_like(lr_up, generator)
            if sampler == "ddim":
                return sample_ddim(denoise, x_t, sched, eta=eta, **common)
            return sample_ddpm(denoise, x_t, sched, **common)
