"""DomainEval: the forgetting check. SR metrics per val domain at chosen steps, relative to step 0.

Fine-tuning on anime faces may cost quality on the original domains (FFHQ, CelebA-HQ). This callback measures
every val domain before the first update (the baseline) and again at chosen steps, and logs
``forget/{domain}/{metric}`` = value - baseline for the original domains.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from tqdm.auto import tqdm

from sr3_lightning.callbacks.eval_tables import metrics_table, write_image_table
from sr3_lightning.callbacks.sample_grid import log_wandb_image, run_dir, to_png, val_domains
from sr3_lightning.callbacks.val_batches import add_to_digest, loader_size, regroup
from sr3_lightning.diffusion.sampling import image_generator
from sr3_lightning.metrics import (
    build_lpips,
    check_lpips_weights,
    consistency,
    lpips_distance,
    psnr,
    ssim,
    to_uint8,
)
from sr3_lightning.models.eval_mode import eval_mode

log = logging.getLogger(__name__)

DIVERSITY_GRID_IMAGES = 4  # rows of the diversity grid: the first images of the domain


def sampler_tag(
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    objective: str = "diffusion",
) -> str:
    """DomainEval's sampler settings as a name (see ``DomainEval.settings_tag``); a report compares runs
    by it too, since numbers measured with other samplers are not comparable."""
    if objective == "regression":
        return "regression"
    eta_part = f"-eta{float(eta)}" if sampler == "ddim" else ""
    return f"{sampler}-{steps or 'all'}{eta_part}-seed{seed}"


class DomainEval(Callback):
    """PSNR, SSIM, LPIPS and LR consistency of full SR chains on every val domain at chosen steps.

    Evaluates at ``on_train_start`` (global step 0 in a fresh run: the baseline), whenever ``global_step``
    is a multiple of ``every_n_steps`` or listed in ``at_steps``, and at the end (``at_end``); a step is never
    evaluated twice. Per domain, all val images are super-resolved with the same ``seed`` each time and the
    per-image metrics (uint8-quantised as the reference does) are averaged:

    - ``val/{domain}/{psnr,ssim,lpips,consistency}`` (+ ``diversity`` when ``diversity_samples >= 2``);
    - ``val/{domain}/bicubic_{psnr,ssim,lpips,consistency}``: ``lr_up`` vs HR, a flat reference line;
    - ``forget/{domain}/{metric}`` = value - baseline, for ``original_domains`` only, and only while the
      domain's val images are those the baseline measured.

    Metrics go to every logger at ``trainer.global_step`` and stay in ``self.history`` (step -> metrics).
    Per-image values are written to ``{run_dir}/eval/{domain}_step{step:06d}.csv`` (and a W&B table
    ``eval/{domain}``). ``python -m sr3_lightning test`` evaluates a checkpoint (or ``init_from`` weights)
    once, the same way, at the step it was trained to, into ``RUN/test/<settings_tag()>/``.

    The baseline, its images, history and evaluated steps are in ``state_dict`` so a
    resumed run keeps measuring against the original step 0 (restored when sampler, steps, eta and seed are
    unchanged and the checkpoint already drew per-image noise; otherwise the first evaluation becomes the
    baseline, with a warning). Rank zero evaluates, other ranks go on (under DDP they wait at the next
    gradient sync; keep an evaluation shorter than the process-group timeout).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        at_steps: list[int] | None = None,
        at_end: bool = True,
        original_domains: list[str] | None = None,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        seed: int = 0,
        lpips: bool = True,
        lpips_backbone: Literal["pretrained", "random"] = "pretrained",
        diversity_samples: int = 0,
        batch_size: int | None = 64,
    ) -> None:
        """
        Args:
            every_n_steps: evaluate when ``global_step`` is a multiple of this (None: only ``at_steps``).
            at_steps: explicit global steps to evaluate at, e.g. [400, 1200, 2000, 4000, 12000].
            at_end: also evaluate when training ends (skipped if that step was already evaluated).
            original_domains: val domains the model was trained on before fine-tuning (e.g. [ffhq, celebahq]);
                they get ``forget/{domain}/*`` keys. Each must be a val domain.
            sampler: ``ddpm`` (ancestral, the reference) or ``ddim``.
            steps: K, respace the chain to K steps (faster); None (default) runs all T, as the reference
                validates (its numbers; slow).
            eta: DDIM noise scale (0 = deterministic); ignored by ``ddpm``.
            seed: seed of the sampling noise, reused at every evaluation so steps differ only by the weights.
            lpips: compute LPIPS (AlexNet). Needs the torchvision AlexNet file in the torch hub cache; without
                it ``fit`` stops before it starts, naming the file (place it, or set ``lpips: false``).
            lpips_backbone: ``random`` is for tests only: LPIPS with an untrained AlexNet, needing no file.
                Its numbers are not LPIPS and are logged as ``lpips_random``, never as ``lpips``.
            diversity_samples: n >= 2 draws n samples per image (seeds ``seed .. seed+n-1``; the first is the
                one scored) and logs ``val/{domain}/diversity``: the per-pixel std over the n samples
                (population std, on (x+1)/2 so in [0, 0.5]) averaged over pixels and images; 0 for the
                regression objective. Also saves ``{run_dir}/grids/diversity_{domain}_step{step:06d}.png``
                (rows: first images; columns: bicubic | n samples | HR). 0 = off; costs n chains per image.
            batch_size: images super-resolved at once (64: the study's 8 or the reference's 50 val images
                in one batch, the fewest network calls); lower it if the GPU runs out of memory, None =
                all of a domain's images. Each image draws its noise from ``seed`` and its key, so the
                numbers do not depend on it.
        """
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: use a positive number of steps, or null")
        if at_steps is not None and any(s < 0 for s in at_steps):
            raise ValueError(f"at_steps={at_steps}: global steps start at 0")
        if steps is not None and steps < 1:
            raise ValueError(f"steps={steps}: use a positive number of sampling steps, or null for all T")
        if diversity_samples == 1 or diversity_samples < 0:
            raise ValueError(f"diversity_samples={diversity_samples}: use 0 (off) or at least 2 samples")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: use a positive number of images, or null for all")
        self.every_n_steps = every_n_steps
        self.at_steps = sorted(set(at_steps or []))
        self.at_end = at_end
        self.original_domains = list(original_domains or [])
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.seed = seed
        self.lpips = lpips
        self.lpips_backbone = lpips_backbone
        self.diversity_samples = diversity_samples
        self.batch_size = batch_size
        self.lpips_name = "lpips" if lpips_backbone == "pretrained" else "lpips_random"
        self.baseline: dict[str, dict[str, float]] | None = None  # domain -> metric -> value at baseline_step
        self.baseline_step: int | None = None
        self.baseline_keys: dict[str, list[str]] | None = None  # domain -> the images the baseline measured
        self.baseline_digests: dict[str, str] = {}  # domain -> a hash of those images' keys and pixels
        self.bicubic: dict[str, dict[str, float]] = {}  # domain -> bicubic_* metrics of the last evaluation
        self.history: dict[int, dict[str, float]] = {}  # global step -> every key logged at that step
        self.evaluated_steps: set[int] = set()
        self._lpips_model: torch.nn.Module | None = None
        self._run_dir: Path | None = None
        self._weights_step: int | None = None  # the step of the checkpoint restored in this trainer call

    def check_inputs(self, val_names: list[str] | None = None) -> None:
        """What evaluation will need, checked before a run starts: the LPIPS AlexNet weights, and the
        original domains among the val domains (when ``val_names`` is given)."""
        if val_names is not None:
            self.check_domains(val_names)
        if self.lpips and self.lpips_backbone == "pretrained":
            check_lpips_weights()

    def check_domains(self, val_names: list[str]) -> None:
        """Forgetting is measured on original domains: each must be evaluated, so among the val domains."""
        unknown = sorted(set(self.original_domains) - set(val_names))
        if unknown:
            raise ValueError(
                f"original_domains {unknown} are not val domains; the val domains are {val_names}: "
                "add them to data.val or correct the DomainEval callback's original_domains"
            )

    def settings_tag(self, objective: str = "diffusion") -> str:
        """The sampler settings as a name, e.g. ``ddpm-all-seed0`` or ``ddim-50-eta0.0-seed0`` (``regression``
        for the one-pass model, which has no sampler): ``test`` logs each setting into a directory of its
        own, so measurements with other samplers never share rows."""
        return sampler_tag(self.sampler, self.steps, self.eta, self.seed, objective)

    @property
    def state_key(self) -> str:
        # What defines the measurement, not the schedule: a resumed run may list more at_steps and still get
        # its baseline back, while a changed sampler does not compare against a baseline it never measured.
        # `noise` marks per-image noise (seed and key): baselines measured with one generator per domain
        # (checkpoints from before) are not compared against.
        return self._generate_state_key(
            sampler=self.sampler, steps=self.steps, eta=self.eta, seed=self.seed, noise="per-image"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "baseline_step": self.baseline_step,
            "baseline_keys": self.baseline_keys,
            "baseline_digests": self.baseline_digests,
            "bicubic": self.bicubic,
            "history": self.history,
            "evaluated_steps": sorted(self.evaluated_steps),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict["baseline"]
        self.baseline_step = state_dict["baseline_step"]
        self.baseline_keys = state_dict.get("baseline_keys")  # None in checkpoints from before it was kept
        self.baseline_digests = dict(state_dict.get("baseline_digests") or {})
        self.bicubic = dict(state_dict["bicubic"])
        self.history = {int(k): v for k, v in state_dict["history"].items()}
        self.evaluated_steps = set(state_dict["evaluated_steps"])

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._run_dir = run_dir(trainer)
        self._weights_step = None  # restoring a checkpoint (after setup) sets it
        if self.lpips and self._lpips_model is None and stage in ("fit", "test"):  # not in validate
            # Built on every rank, before training starts, so missing weights stop all ranks at once.
            self._lpips_model = build_lpips(pretrained_backbone=self.lpips_backbone == "pretrained")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.baseline is None:  # a fresh run; a resumed one brings its baseline in the checkpoint
            if trainer.global_step > 0:
                log.warning(
                    "DomainEval: no baseline in the checkpoint (callback added, sampler/steps/eta/seed "
                    "changed, or a checkpoint from before per-image evaluation noise); step %d becomes the "
                    "baseline of forget/*",
                    trainer.global_step,
                )
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step in self.at_steps or (self.every_n_steps is not None and step % self.every_n_steps == 0):
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_end:
            self._evaluate(trainer, pl_module)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._weights_step = int(checkpoint.get("global_step", 0))

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``test``: one evaluation of the weights under test, logged at the step they were trained to.
        ``forget/*`` compares with the baseline of the run that saved them, when the checkpoint holds one
        for this sampler; the run's history stays as it was."""
        step = trainer.global_step if self._weights_step is None else self._weights_step
        self._evaluate(trainer, pl_module, step=step, record=False)
        if trainer.is_global_zero:
            metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
            tag = self.settings_tag(pl_module.hparams.objective)
            print(
                f"DomainEval of the weights at step {step}, {tag} (per-image values: "
                f"{self._run_dir}/eval/):\n{metrics_table(metrics)}"
            )
            if self.original_domains and not any(k.startswith("forget/") for k in metrics):
                print(
                    "No forget/* rows: the checkpoint holds no baseline measured with the DomainEval "
                    f"settings {self.settings_tag()} on these val images (a regression run's baseline is "
                    "kept under them too); use the DomainEval settings and data.val of its training run"
                )

    # ------------------------------------------------------------------------------------------- evaluation
    def _evaluate(
        self, trainer: Trainer, pl_module: LightningModule, step: int | None = None, record: bool = True
    ) -> None:
        """Rank 0 evaluates; every rank receives the numbers, so ``ModelCheckpoint(monitor=...)`` can use
        them (they are put in ``trainer.callback_metrics``) and all ranks agree on what was evaluated.
        ``record``: the evaluation belongs to this run (baseline, history, steps evaluated)."""
        step = trainer.global_step if step is None else step
        if record and step in self.evaluated_steps:
            return
        metrics = self._compute(trainer, pl_module, step, record) if trainer.is_global_zero else {}
        metrics = trainer.strategy.broadcast(metrics)
        if record:
            self.evaluated_steps.add(step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _compute(
        self, trainer: Trainer, pl_module: LightningModule, step: int, record: bool
    ) -> dict[str, float]:
        domains = val_domains(trainer)
        self.check_domains([name for name, _ in domains])
        with eval_mode(pl_module), torch.no_grad():
            evaluated = {
                name: self._evaluate_domain(trainer, pl_module, name, dl, step) for name, dl in domains
            }
        results = {name: means for name, (_, _, means) in evaluated.items()}
        if self.baseline is None and record:
            self.baseline, self.baseline_step = results, step
            self.baseline_keys = {name: keys for name, (keys, _, _) in evaluated.items()}
            self.baseline_digests = {name: digest for name, (_, digest, _) in evaluated.items()}
        metrics: dict[str, float] = {}
        for name, values in results.items():
            metrics.update({f"val/{name}/{k}": v for k, v in values.items()})
            metrics.update({f"val/{name}/{k}": v for k, v in self.bicubic[name].items()})
            if name in self.original_domains and self._has_baseline(name, *evaluated[name][:2]):
                base = self.baseline[name]
                metrics.update({f"forget/{name}/{k}": v - base[k] for k, v in values.items() if k in base})
        if record:
            self.history[step] = metrics
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        log.info("DomainEval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _has_baseline(self, domain: str, keys: list[str], digest: str) -> bool:
        """A baseline of these very images: another val set would make forget/* measure the change of set.
        Keys and pixels are compared: shards rebuilt from other images may reuse the names."""
        if not self.baseline or domain not in self.baseline:
            return False
        if self.baseline_keys is not None and self.baseline_keys.get(domain) != keys:
            why = "are not those"
        elif self.baseline_digests.get(domain, digest) != digest:
            why = "have the names but not the pixels"
        else:
            return True
        log.warning(
            "DomainEval: the '%s' val images %s of the baseline at step %s; forget/%s/* is not logged (it "
            "would measure the change of images). Use the data.val (and shards) of the training run.",
            *(domain, why, self.baseline_step, domain),
        )
        return False

    def _evaluate_domain(
        self, trainer: Trainer, pl_module: LightningModule, domain: str, loader: Any, step: int
    ) -> tuple[list[str], str, dict[str, float]]:
        """Score every val image of one domain; writes the per-image CSV/table; returns the keys, a digest
        of the keys and pixels, and the means."""
        device = pl_module.device
        if self._lpips_model is not None:
            self._lpips_model.to(device)
        n_draws = max(1, self.diversity_samples)
        keys: list[str] = []
        digest = hashlib.sha256()
        per_image: dict[str, list[Tensor]] = {}
        bicubic: dict[str, list[Tensor]] = {}
        grid_rows: list[Tensor] = []
        desc, total = f"eval {domain} @ step {step}", loader_size(loader)
        bar = tqdm(desc=desc, unit="img", total=total, disable=None, leave=False)  # None: off without a tty
        for batch in regroup(loader, self.batch_size):
            add_to_digest(digest, batch)
            lr, lr_up, hr = (batch[k].to(device) for k in ("lr", "lr_up", "hr"))
            samples = [
                self._sample(pl_module, lr_up, domain, batch["key"], self.seed + j) for j in range(n_draws)
            ]
            scores = self._image_metrics(samples[0], hr, lr)
            if self.diversity_samples:
                unit = (torch.stack(samples) + 1.0) / 2.0  # [n, B, 3, H, W] in [0, 1]
                scores["diversity"] = unit.std(dim=0, correction=0).flatten(1).mean(dim=1)
                missing = DIVERSITY_GRID_IMAGES - sum(len(r) for r in grid_rows)
                if missing > 0:
                    grid_rows.append(torch.stack([lr_up, *samples, hr], dim=1)[:missing].cpu())
            for k, v in scores.items():
                per_image.setdefault(k, []).append(v.double().cpu())
            for k, v in self._image_metrics(lr_up, hr, lr).items():
                bicubic.setdefault(f"bicubic_{k}", []).append(v.double().cpu())
            keys.extend(batch["key"])
            bar.update(len(hr))
        bar.close()
        if not keys:
            raise ValueError(f"val domain '{domain}' has no images to evaluate")
        columns = {k: torch.cat(v) for k, v in per_image.items()}
        self.bicubic[domain] = {k: torch.cat(v).mean().item() for k, v in bicubic.items()}
        assert self._run_dir is not None, "setup() sets the run directory"
        path = self._run_dir / "eval" / f"{domain}_step{step:06d}.csv"
        write_image_table(trainer, path, f"eval/{domain}", step, keys, columns)
        if grid_rows:
            rows = torch.cat(grid_rows)  # [N, n + 2, 3, H, W]
            path = self._run_dir / "grids" / f"diversity_{domain}_step{step:06d}.png"
            grid = to_png(rows.flatten(0, 1), path, nrow=rows.shape[1])
            caption = f"bicubic | {self.diversity_samples} samples (seeds {self.seed}.. with each key) | HR"
            log_wandb_image(trainer, f"samples/diversity_{domain}", grid, caption, step)
        return keys, digest.hexdigest(), {k: v.mean().item() for k, v in columns.items()}

    def _sample(
        self, pl_module: LightningModule, lr_up: Tensor, domain: str, keys: list[str], seed: int
    ) -> Tensor:
        """One draw for a batch, each image's noise from ``seed`` and its key; out of memory names the fix."""
        generators = [image_generator(seed, f"{domain}:{k}", lr_up.device) for k in keys]
        try:
            result = pl_module.super_resolve(
                lr_up, sampler=self.sampler, steps=self.steps, eta=self.eta, generator=generators
            )
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"DomainEval ran out of memory sampling {len(keys)} '{domain}' images at once: set the "
                f"callback's batch_size lower (e.g. --trainer.callbacks.batch_size={max(1, len(keys) // 4)})"
            ) from err
        return result.images.clamp(-1.0, 1.0)

    def _image_metrics(self, pred: Tensor, hr: Tensor, lr: Tensor) -> dict[str, Tensor]:
        """Per-image ``[B]`` PSNR/SSIM on uint8 (as the reference), LPIPS and LR consistency of pred vs HR."""
        pred_u8, hr_u8 = to_uint8(pred), to_uint8(hr)
        out = {"psnr": psnr(pred_u8, hr_u8), "ssim": ssim(pred_u8, hr_u8)}
        if self._lpips_model is not None:
            out[self.lpips_name] = lpips_distance(self._lpips_model, pred, hr)
        out["consistency"] = consistency(pred, lr)
        return out
