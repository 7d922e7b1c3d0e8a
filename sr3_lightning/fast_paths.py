"""Fast paths for the SR3 UNet and its optimizer: channels_last, fused attention, torch.compile, fused Adam.

Each is a switch on `SR3Module` (``model.channels_last``, ``model.compile``, ``model.fused_attention``,
``model.fused_adam``); ``null`` (the default) picks the fastest setting for the device the trainer runs on
(`FastPaths.resolve`). ``model.compile_mode`` is passed to ``torch.compile``: ``reduce-overhead`` replays
the UNet's forward and backward as CUDA graphs, for steps whose time goes to kernel launches (small
batches; ``benchmarks/profile_step.py`` tells). They are applied in place, so the UNet keeps the
reference's state_dict keys and every checkpoint format still loads. All of them are exact in float32 up
to 1e-5 (tests/test_fast_paths.py).

The other fast paths are Lightning's and need no code here:

- bf16 autocast: ``trainer.precision: bf16-mixed`` (GPU; not bit-compatible with the reference, which is
  why the reference configs keep ``32-true``).
- no host-device synchronisation per step: ``train/loss`` stays on the device and Lightning fetches it
  only every ``trainer.log_every_n_steps`` (``model.progress_bar_loss: true`` shows it each step at the
  cost of one sync per step).
- gradient accumulation: ``trainer.accumulate_grad_batches``. To train at an effective batch B, set
  ``data.batch_size`` to the largest batch that fits (`find_max_batch`, printed by
  ``benchmarks/train_step.py``) and accumulate ceil(B / batch_size) batches.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sr3_lightning.models.unet import SelfAttention

# On CPU (AMD EPYC, fp32, 16->128 UNet, timed by hand on a shared machine): fused Adam is 3.5x faster
# than the for-loop Adam; channels_last makes forward + backward ~25% slower (oneDNN); torch.compile gained
# nothing on the demo model and costs minutes of C++ compilation per run. On CUDA every fast path is on.
CPU_DEFAULTS = {"channels_last": False, "compile": False, "fused_adam": True}
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile_mode={mode!r}: use one of {', '.join(COMPILE_MODES)}")
    return mode


def uses_cuda_graphs(mode: str) -> bool:
    """Whether ``torch.compile(mode=mode)`` replays CUDA graphs (on CUDA devices)."""
    return mode in ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class FastPaths:
    """Resolved fast-path switches for one device (no ``None`` left)."""

    channels_last: bool = False
    compile: bool = False
    fused_attention: bool = True
    fused_adam: bool = False
    compile_mode: str = "default"

    @classmethod
    def resolve(
        cls,
        device: torch.device | str,
        channels_last: bool | None = None,
        compile: bool | None = None,
        fused_attention: bool = True,
        fused_adam: bool | None = None,
        compile_mode: str = "default",
    ) -> FastPaths:
        """Fill each ``None`` with the fastest setting for ``device`` (CUDA: all on; CPU: `CPU_DEFAULTS`)."""
        device = torch.device(device)
        auto = {"channels_last": True, "compile": True, "fused_adam": True}
        if device.type != "cuda":
            auto = CPU_DEFAULTS if device.type == "cpu" else {k: False for k in auto}
        return cls(
            channels_last=auto["channels_last"] if channels_last is None else channels_last,
            compile=auto["compile"] if compile is None else compile,
            fused_attention=fused_attention,
            fused_adam=auto["fused_adam"] if fused_adam is None else fused_adam,
            compile_mode=check_compile_mode(compile_mode),
        )

    def apply(self, unet: nn.Module) -> nn.Module:
        """Apply the module-side paths to ``unet`` in place (idempotent; keys and weights unchanged)."""
        if getattr(unet, "_fast_paths", None) == self:
            return unet
        unet.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        for m in unet.modules():
            if isinstance(m, SelfAttention):
                use_math_attention(m, not self.fused_attention)
        if self.compile:
            # static shapes: an evaluation at another batch size gets its own graph instead of turning
            # the training graph into a slower dynamic-shape one
            unet.compile(mode=self.compile_mode, dynamic=False)
        elif getattr(unet, "_compiled_call_impl", None) is not None:
            unet._compiled_call_impl = None  # undo an earlier nn.Module.compile()
        unet._fast_paths = self
        return unet


def _math_attention_forward(self: SelfAttention, x: Tensor) -> Tensor:
    """`SelfAttention.forward` on SDPA's unfused math backend: softmax(q k^T / sqrt(C)) v, as the reference's
    einsum computes it (one [HW, HW] attention matrix in memory)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return SelfAttention.forward(self, x)


def use_math_attention(attn: SelfAttention, enabled: bool = True) -> None:
    """Switch one attention block to the unfused math path (or back to fused SDPA with ``enabled=False``).

    A bound method on the instance, so ``copy.deepcopy`` (the EMA copy) rebinds it to the copy.
    """
    if enabled:
        attn.forward = types.MethodType(_math_attention_forward, attn)
    else:
        attn.__dict__.pop("forward", None)


def fused_adam_supported(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu")


def use_fused_adam(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Switch Adam/AdamW optimizers to the fused kernel (one launch for all parameters); returns how many.

    Works after ``load_state_dict`` too (which resets ``fused`` to the saved groups' value, e.g. the
    reference's ``_opt.pth``): the step counters move to the parameters' device as the fused kernel
    expects, and moments are laid out like their parameters (channels_last). Optimizers of other
    types, or with parameters on a device without fused kernels, are left as they are.
    """
    switched = 0
    for opt in optimizers:
        if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        if not params or not all(fused_adam_supported(p.device) for p in params):
            continue
        if any(g.get("differentiable") or g.get("capturable") for g in opt.param_groups):
            continue
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, False
        for p in params:
            state = opt.state.get(p)
            if not state:
                continue
            step = torch.as_tensor(state["step"])  # a copy: a loaded state may share it with its source
            state["step"] = step.detach().to(p.device, torch.float32, copy=True)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state and state[key].stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(state[key])
        opt.defaults.update(fused=True, foreach=False)
        opt._step_supports_amp_scaling = True
        switched += 1
    return switched


def compile_for_sampling(unet: nn.Module, cuda_graphs: bool = True) -> nn.Module:
    """Compile ``unet`` in place for the reverse chain, whose shapes stay fixed for the whole loop.

    On CUDA with ``cuda_graphs`` it uses ``mode="reduce-overhead"``: each network evaluation replays one
    CUDA graph, removing the per-kernel launch cost that dominates small-batch sampling.
    """
    on_cuda = next(unet.parameters()).is_cuda
    unet.compile(mode="reduce-overhead" if cuda_graphs and on_cuda else "default", dynamic=False)
    return unet


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def predict_max_batch(
    small: tuple[int, int], large: tuple[int, int], capacity: int, headroom: float = 0.92
) -> int:
    """The batch whose peak memory reaches ``headroom * capacity`` bytes, extrapolated linearly from two
    measured ``(batch, peak bytes)`` points: a starting guess that saves most of a blind doubling search."""
    (b0, m0), (b1, m1) = small, large
    if b1 <= b0 or m1 <= m0:
        raise ValueError(f"need two points with growing batch and memory, got {small} and {large}")
    per_image = (m1 - m0) / (b1 - b0)
    return max(1, int((headroom * capacity - (m0 - per_image * b0)) / per_image))


def find_max_batch(
    try_batch: Callable[[int], None], start: int = 4, limit: int = 1024, growth: float = 2.0
) -> int:
    """Largest batch size in [1, limit] for which ``try_batch(b)`` (e.g. one training step) does not run
    out of memory: growing from ``start`` by ``growth`` (doubling; less from a good guess such as
    `predict_max_batch`), then bisection. Returns 0 when even batch 1 does not fit."""

    def fits(b: int) -> bool:
        try:
            try_batch(b)
            return True
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    lo, hi = 0, None  # lo fits, hi does not
    b = max(1, min(start, limit))
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                return b
            b = min(max(b + 1, int(b * growth)), limit)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
