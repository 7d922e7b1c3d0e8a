"""Image-quality metrics computed as the reference SR3 code computes them, so numbers match its tables.

The reference (Janspiry, `core/metrics.py`) quantises network output to uint8 (`tensor2img`) and measures
PSNR / SSIM on those uint8 RGB arrays in float64. We do the same with torch, batched, without cv2, and
check it against the reference's numbers (tests/test_metrics.py):
- `to_uint8`: [-1, 1] float -> uint8, as `tensor2img`.
- `psnr`, `ssim`: on uint8 `[B, 3, H, W]`, one value per image `[B]`.
- `consistency`: PSNR between the SR result downsampled to the LR size and the LR input.
- `build_lpips` / `lpips_distance`: LPIPS (AlexNet) that never downloads; missing weights give a clear error.
"""

from __future__ import annotations

import os
import warnings

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import AlexNet_Weights

SSIM_WINDOW = 11  # cv2.getGaussianKernel(11, 1.5) in the reference
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

ALEXNET_URL = AlexNet_Weights.IMAGENET1K_V1.url  # .../alexnet-owt-7be5be79.pth, what lpips would download


def to_uint8(x: Tensor) -> Tensor:
    """Quantise images in [-1, 1] to uint8 exactly as the reference `tensor2img` does.

    float32, clamp to [-1, 1], (x + 1) / 2, then (x * 255).round() (half to even, like numpy) -> uint8.
    Elementwise, so the layout is kept: `[B, 3, H, W]` in, uint8 `[B, 3, H, W]` (CHW, not HWC) out.
    """
    x = x.detach().float().clamp(-1.0, 1.0)
    return (((x + 1.0) / 2.0) * 255.0).round().to(torch.uint8)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"metric inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError(f"metric inputs must be uint8 (use to_uint8 first), got {a.dtype} and {b.dtype}")
    if a.dim() != 4:
        raise ValueError(f"metric inputs must be [B, C, H, W], got shape {tuple(a.shape)}")


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR per image as the reference `calculate_psnr`: 20 * log10(255 / sqrt(mse)), float64.

    mse is over the whole image, all channels; identical images give inf. a, b: uint8 [B, C, H, W] -> [B].
    """
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return 20.0 * torch.log10(255.0 / mse.sqrt())  # mse == 0 -> 255 / 0 = inf -> inf, as the reference


def _gaussian_window(channels: int, device: torch.device) -> Tensor:
    """cv2.getGaussianKernel(11, 1.5) outer itself, one copy per channel: [C, 1, 11, 11] float64."""
    i = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(i**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per image as the reference `calculate_ssim` on RGB, float64.

    The reference's RGB branch calls its single-image `ssim` on the full 3-channel array (three times, same
    result), so cv2.filter2D filters each channel and the map is averaged over channels and pixels. Its
    5-pixel border crop after filtering equals a 'valid' convolution, done here with conv2d(groups=C).
    a, b: uint8 [B, C, H, W] with H, W >= 11 -> [B].
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape)}")
    x, y = a.double(), b.double()
    window = _gaussian_window(x.shape[1], x.device)

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = filt(x), filt(y)
    mu_xx, mu_yy, mu_xy = mu_x**2, mu_y**2, mu_x * mu_y
    var_x = filt(x * x) - mu_xx
    var_y = filt(y * y) - mu_yy
    cov = filt(x * y) - mu_xy
    ssim_map = ((2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_xx + mu_yy + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def consistency(sr: Tensor, lr: Tensor) -> Tensor:
    """LR consistency: PSNR between the SR result downsampled to the LR size and the LR input.

    High when the SR output agrees with its conditioning. The SR image is clamped to [-1, 1] (as a saved
    image would be), downsampled in float with bicubic + antialias (torch then uses the a = -0.5 kernel
    with a support widened by the scale, which is what PIL's BICUBIC resize does), and both sides are
    quantised with `to_uint8` before `psnr`. sr: [B, 3, H, W], lr: [B, 3, h, w], both in [-1, 1] -> [B].
    """
    if sr.dim() != 4 or lr.dim() != 4 or sr.shape[:2] != lr.shape[:2]:
        raise ValueError(f"consistency needs sr [B, C, H, W] and lr [B, C, h, w], got {sr.shape}, {lr.shape}")
    down = F.interpolate(
        sr.detach().float().clamp(-1.0, 1.0),
        size=tuple(lr.shape[-2:]),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    return psnr(to_uint8(down), to_uint8(lr))


class LpipsWeightsMissing(FileNotFoundError):
    """The AlexNet backbone file LPIPS needs is not in the torch hub cache (and we never download it)."""


def check_lpips_weights() -> str:
    """The AlexNet file's path, or `LpipsWeightsMissing` naming it and the two ways out."""
    path = alexnet_weights_path()
    if not os.path.isfile(path):
        raise LpipsWeightsMissing(
            f"LPIPS needs the AlexNet weights at {path}, which does not exist (nothing is downloaded). "
            f"Either place the file there (download {ALEXNET_URL}; the directory follows TORCH_HOME), "
            "or turn LPIPS off: `lpips: false` in the DomainEval callback (--trainer.callbacks.lpips=false), "
            "`--lpips false` for diffsr-calibrate and benchmarks/diffsr_eval.py."
        )
    return path


def alexnet_weights_path() -> str:
    """Where torchvision caches the AlexNet weights: torch.hub.get_dir()/checkpoints/ (follows TORCH_HOME)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(ALEXNET_URL))


def _load_alexnet_backbone(net: torch.nn.Module, path: str) -> None:
    """Copy torchvision AlexNet `features.<i>.*` weights into lpips's `slice<k>.<i>.*` modules.

    lpips splits `alexnet().features` into slices but keeps each layer's index as its name, so
    `slice2.3.weight` is `features.3.weight`. Every slice tensor must be found with the same shape.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    targets = net.state_dict()
    mapped: dict[str, Tensor] = {}
    for name, tensor in targets.items():
        _, index, param = name.split(".")  # "slice2.3.weight"
        key = f"features.{index}.{param}"
        if key not in state:
            raise RuntimeError(f"{path}: no '{key}' for lpips '{name}'; is this torchvision's AlexNet file?")
        if state[key].shape != tensor.shape:
            raise RuntimeError(
                f"{path}: '{key}' has shape {tuple(state[key].shape)}, "
                f"lpips '{name}' needs {tuple(tensor.shape)}"
            )
        mapped[name] = state[key]
    net.load_state_dict(mapped, strict=True)


def build_lpips(
    device: torch.device | str | None = None, pretrained_backbone: bool = True
) -> torch.nn.Module:
    """LPIPS (AlexNet, v0.1) in eval mode with frozen parameters, built without any download.

    The linear-layer weights ship inside the lpips package; the AlexNet backbone is read from torchvision's
    cache (`alexnet_weights_path()`), checked before anything is constructed, so clusters without network
    get `LpipsWeightsMissing` naming the file instead of a hanging download.
    `pretrained_backbone=False` keeps a random backbone: for tests only; its numbers are not LPIPS and must
    never be logged as `lpips`.
    """
    path = check_lpips_weights() if pretrained_backbone else ""
    with warnings.catch_warnings():
        # lpips calls tv.alexnet(pretrained=False); torchvision warns that the argument is deprecated.
        warnings.filterwarnings("ignore", message=".*deprecated since 0.13.*", category=UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    if pretrained_backbone:
        _load_alexnet_backbone(model.net, path)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """LPIPS per image between a and b: float [B, 3, H, W] in [-1, 1] (clamped, as saved images are) -> [B].

    Inputs are moved to the model's device; the result stays there.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"lpips_distance needs two [B, 3, H, W] tensors, got {a.shape}, {b.shape}")
    device = next(model.parameters()).device
    a = a.detach().float().clamp(-1.0, 1.0).to(device)
    b = b.detach().float().clamp(-1.0, 1.0).to(device)
    return model(a, b).flatten()
