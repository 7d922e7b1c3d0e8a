"""Data throughput: make_shards images/s and train-loader samples/s (batch 4, 0 and 2 workers).

    python benchmarks/data_throughput.py [--images 512] [--src-size 256] [--batches 300] [--gpu-step-ms MS]

The loader must deliver at least 5x what a 16->128 training step consumes on the target GPU (H100). Without
--gpu-step-ms the step time is estimated from the UNet's FLOPs: a batch-4 train step (forward + backward) of
the reference 16->128 UNet is 1.108 TFLOP (counted with torch's FlopCounterMode on the meta device), run at
35% of the H100 SXM dense BF16 peak (989 TFLOPS) -> 3.2 ms/step -> ~1250 samples/s; an optimistic figure
(real steps at batch 4 are slower, being launch-bound), so the loader target it gives is conservative.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from dataset_tools.make_shards import make_shards
from sr3_lightning.data import shards
from sr3_lightning.data.datamodule import SR3DataModule, TrainDomain

H100_BF16_DENSE_FLOPS = 989e12
ASSUMED_MFU = 0.35
REFERENCE_STEP_FLOPS = 1.108e12  # fallback if the UNet cannot be imported
LIMIT = 128  # the largest training subset of the limited-data study


def write_sources(folder: Path, n: int, size: int) -> None:
    """Face-sized synthetic photos: smooth colour fields plus noise (PNG compresses them like photos)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        phase = rng.uniform(0, 6, 3)
        base = 127 + 100 * np.sin(6 * x[..., None] + 4 * y[..., None] + phase)
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def step_flops(batch_size: int) -> float:
    """FLOPs of one training step (forward + backward) of the reference 16->128 UNet."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        from sr3_lightning.models.unet import UNet
    except ImportError:
        return REFERENCE_STEP_FLOPS * batch_size / 4
    with torch.device("meta"):
        net = UNet()
        x, noise_level = torch.randn(batch_size, 6, 128, 128), torch.rand(batch_size)
    with FlopCounterMode(display=False) as counter:
        net(x, noise_level).sum().backward()
    return float(counter.get_total_flops())


class EmptyBatches(IterableDataset):
    """Batches of the right shapes that cost nothing to make: what the DataLoader's transfer alone allows."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __iter__(self):
        b = self.batch_size
        while True:
            yield {
                "hr": torch.from_numpy(np.zeros((b, 3, 128, 128), np.float32)),
                "lr": torch.from_numpy(np.zeros((b, 3, 16, 16), np.float32)),
                "lr_up": torch.from_numpy(np.zeros((b, 3, 128, 128), np.float32)),
            }


def loader_rate(loader: DataLoader, batches: int, batch_size: int) -> float:
    it = iter(loader)
    for _ in islice(it, 20):  # warm-up: worker start, page cache
        pass
    start = time.perf_counter()
    for _ in islice(it, batches):
        pass
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="synthetic source images")
    parser.add_argument("--src-size", type=int, default=256, help="their side in px")
    parser.add_argument("--batches", type=int, default=300, help="timed loader batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gpu-step-ms", type=float, default=None, help="measured 16->128 train step time")
    args = parser.parse_args()
    if min(args.images, args.src_size, args.batches, args.batch_size) < 1:
        raise SystemExit("--images, --src-size, --batches and --batch-size must each be at least 1")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    if args.gpu_step_ms is None:
        flops = step_flops(args.batch_size)
        args.gpu_step_ms = 1e3 * flops / (H100_BF16_DENSE_FLOPS * ASSUMED_MFU)
        basis = f"{flops / 1e12:.3f} TFLOP/step at {ASSUMED_MFU:.0%} of H100 BF16 peak"
    else:
        basis = "measured, --gpu-step-ms"
    gpu_rate = args.batch_size * 1e3 / args.gpu_step_ms
    rows: list[tuple[str, int, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        write_sources(src, args.images, args.src_size)
        for workers in sorted({1, 2, min(8, os.cpu_count() or 1)}):
            start = time.perf_counter()
            make_shards(src, out / str(workers), "bench", 16, 128, workers=workers, progress=False)
            speed = args.images / (time.perf_counter() - start)
            rows.append((f"make_shards {args.src_size}px -> 16/128", workers, speed, "images/s"))
        subset = min(LIMIT, args.images)
        for label, limit, cache_bytes in (
            (f"loader, {subset}-image subset (in memory)", subset, shards.CACHE_BYTES),
            (f"loader, {args.images} images (streamed)", None, 0),  # as if too large to keep decoded
        ):
            shards.CACHE_BYTES = cache_bytes
            for workers in (0, 2):
                train = TrainDomain("bench", str(out / "1"), limit)
                loader = SR3DataModule(
                    train, batch_size=args.batch_size, num_workers=workers
                ).train_dataloader()
                rows.append((label, workers, loader_rate(loader, args.batches, args.batch_size), "samples/s"))
        empty = DataLoader(EmptyBatches(args.batch_size), batch_size=None, num_workers=2)
        speed = loader_rate(empty, args.batches, args.batch_size)
        rows.append(("DataLoader transfer only (no work)", 2, speed, "samples/s"))

    print(
        f"\nCPU cores: {os.cpu_count()}; GPU consumption: {gpu_rate:.0f} samples/s "
        f"({args.gpu_step_ms:.2f} ms/step, {basis}); target >= 5x = {5 * gpu_rate:.0f} samples/s\n"
    )
    title = f"stage (loader batch {args.batch_size})"
    print(f"| {title:38} | workers | {'rate':>6} | unit      | vs GPU |")
    print(f"|{'-' * 40}|---------|--------|-----------|--------|")
    for stage, workers, speed, unit in rows:
        ratio = f"{speed / gpu_rate:.1f}x" if unit == "samples/s" else ""
        print(f"| {stage:38} | {workers:7d} | {speed:6.0f} | {unit:9} | {ratio:>6} |")


if __name__ == "__main__":
    main()
