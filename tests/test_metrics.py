"""Metrics against numbers from the reference SR3 code (tests/fixtures/reference/README.md, "Metrics")."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import alexnet

from sr3_lightning.metrics import (
    LpipsWeightsMissing,
    alexnet_weights_path,
    build_lpips,
    consistency,
    lpips_distance,
    psnr,
    ssim,
    to_uint8,
)

REF = Path(__file__).parent / "fixtures" / "reference"


def load_png(name: str) -> torch.Tensor:
    """uint8 [1, 3, H, W] RGB pixels of a reference PNG."""
    return load_pil(Image.open(REF / name).convert("RGB"))


def load_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous()


def to_float(u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] float, as the reference's ToTensor()*2-1."""
    return u8.float() / 255.0 * 2.0 - 1.0


METRICS_REF = json.loads((REF / "metrics_ref.json").read_text())


@pytest.mark.parametrize("entry", METRICS_REF, ids=[e["image"] for e in METRICS_REF])
def test_psnr_ssim_match_reference(entry: dict) -> None:
    a, b = load_png(entry["image"]), load_png(entry["reference"])
    assert psnr(a, b).item() == pytest.approx(entry["psnr"], abs=1e-6)
    assert ssim(a, b).item() == pytest.approx(entry["ssim"], abs=1e-5)


def test_batched_metrics_match_reference_per_image() -> None:
    images = torch.cat([load_png(e["image"]) for e in METRICS_REF])
    refs = torch.cat([load_png(e["reference"]) for e in METRICS_REF])
    p, s = psnr(images, refs), ssim(images, refs)
    assert p.shape == s.shape == (len(METRICS_REF),)
    assert p.dtype == s.dtype == torch.float64
    torch.testing.assert_close(p, torch.tensor([e["psnr"] for e in METRICS_REF], dtype=torch.float64))
    torch.testing.assert_close(s, torch.tensor([e["ssim"] for e in METRICS_REF], dtype=torch.float64))


def test_to_uint8_gives_back_reference_pngs() -> None:
    tensors = torch.load(REF / "prep_tensors.pt")
    out = to_uint8(torch.stack([tensors["val_sr"], tensors["val_hr"]]))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 128, 128)
    assert torch.equal(out[:1], load_png("prep_sr_16_128.png"))
    assert torch.equal(out[1:], load_png("prep_hr_128.png"))


def tensor2img_reference(x: np.ndarray) -> np.ndarray:
    """The reference `tensor2img` steps on a float32 array: clamp, (x - (-1)) / 2, (x * 255.0).round()."""
    x = np.clip(x.astype(np.float32), -1, 1)
    x = (x - np.float32(-1)) / np.float32(2)
    return (x * 255.0).round().astype(np.uint8)


def test_to_uint8_float32_rounding_matches_reference() -> None:
    # Values at and next to each half grey level; float64 or round-half-away would get ~190 of them wrong.
    halves = (2 * (np.arange(255) + 0.5) / 255 - 1).astype(np.float32)
    x = np.concatenate(
        [
            halves,
            np.nextafter(halves, np.float32(2)),
            np.nextafter(halves, np.float32(-2)),
            np.float32([-3.0, -1.0, 0.0, 1.0, 3.0]),
        ]
    )
    assert np.array_equal(to_uint8(torch.from_numpy(x)).numpy(), tensor2img_reference(x))


def test_identical_images() -> None:
    hr = load_png("prep_hr_128.png").repeat(2, 1, 1, 1)
    assert torch.isinf(psnr(hr, hr)).all()
    torch.testing.assert_close(ssim(hr, hr), torch.ones(2, dtype=torch.float64))


def test_metrics_reject_float_and_mismatched_inputs() -> None:
    hr = load_png("prep_hr_128.png")
    with pytest.raises(ValueError, match="uint8"):
        psnr(hr.float(), hr.float())
    with pytest.raises(ValueError, match="shape"):
        ssim(hr, hr[..., :64])


def test_consistency_of_bicubic_upsample_with_its_lr() -> None:
    lr = to_float(load_png("prep_lr_16.png"))
    sr = to_float(load_png("prep_sr_16_128.png"))  # bicubic upsample of exactly this LR
    own = consistency(sr, lr)
    assert own.shape == (1,)
    assert own.item() > 30.0  # 33.38 dB when computed
    flipped = consistency(sr.flip(-1), lr)  # same content, mirrored: disagrees with the LR
    assert flipped.item() < 15.0
    batch = consistency(torch.cat([sr, sr.flip(-1)]), torch.cat([lr, lr]))
    torch.testing.assert_close(batch, torch.cat([own, flipped]))


def test_consistency_downsample_matches_pil_bicubic() -> None:
    # PIL BICUBIC is antialiased, a = -0.5; plain torch bicubic (a = -0.75, no antialias) gets ~22 dB here.
    hr_img = Image.open(REF / "prep_hr_128.png").convert("RGB")
    hr = to_float(load_pil(hr_img))
    for size in (16, 32):
        pil_lr = to_float(load_pil(hr_img.resize((size, size), Image.BICUBIC)))
        assert consistency(hr, pil_lr).item() > 50.0


def test_lpips_missing_weights_names_file_and_way_out(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    assert alexnet_weights_path() == expected
    with pytest.raises(LpipsWeightsMissing) as info:
        build_lpips()
    message = str(info.value)
    assert expected in message
    assert "lpips: false" in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    assert not os.listdir(tmp_path)  # nothing downloaded or created


def test_lpips_random_backbone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no weights there: must not be needed
    torch.manual_seed(0)
    model = build_lpips(pretrained_backbone=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    sr = to_float(load_png("prep_sr_16_128.png"))
    hr = to_float(load_png("prep_hr_128.png"))
    a, b = torch.cat([hr, sr]), torch.cat([hr, hr])
    d = lpips_distance(model, a, b)
    assert d.shape == (2,)
    assert d[0].item() == pytest.approx(0.0, abs=1e-7)
    assert d[1].item() > 0.0


def test_lpips_loads_backbone_from_cache_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = alexnet().eval()  # random weights standing in for the ImageNet ones
    path = Path(alexnet_weights_path())
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    model = build_lpips(pretrained_backbone=True)
    slices = model.net
    for k, index in [(1, 0), (2, 3), (3, 6), (4, 8), (5, 10)]:
        conv = getattr(getattr(slices, f"slice{k}"), str(index))
        assert torch.equal(conv.weight, reference.features[index].weight)
        assert torch.equal(conv.bias, reference.features[index].bias)

    # End to end: each lpips slice output equals torchvision's features up to the same layer.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = slices(x)
        for out, end in zip(outs, [2, 5, 8, 10, 12]):
            torch.testing.assert_close(out, reference.features[:end](x))


def test_lpips_rejects_wrong_backbone_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = Path(alexnet_weights_path())
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="features.0"):
        build_lpips()
