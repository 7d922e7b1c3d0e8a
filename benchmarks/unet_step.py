"""UNet forward time and training steps/s, fp32 eager, no Lightning (by hand; prints a table, writes JSON).

    python benchmarks/unet_step.py --configs real tiny --batch 4 --repeats 5
    python benchmarks/unet_step.py --configs real --batch 8 --device cuda    # t_fwd of the README cost table

Eager fp32 without the fast paths (compile, channels_last) that ``fit`` turns on with CUDA: an upper bound
on what a GPU run spends per step and per evaluation forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from device_info import device_name, synchronize
from step_harness import CONFIGS  # the 16->128 model and the demo's

from sr3_lightning.diffusion import denoising_loss, make_schedule, sample_noise_level
from sr3_lightning.models.unet import UNet


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (cuDNN picks its algorithms)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    cfg, T = CONFIGS[name]
    unet = UNet(cfg).to(device)
    sched = make_schedule("linear", T).to(device)
    size = cfg.image_size
    x = torch.randn(batch, 6, size, size, device=device)
    level = torch.rand(batch, device=device)
    hr, cond = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)

    def forward() -> None:
        with torch.no_grad():
            unet.eval()(x, level)

    def train_step() -> None:
        unet.train()
        _, g = sample_noise_level(sched, batch)
        loss = denoising_loss(unet, hr, cond, g, torch.randn_like(hr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fwd, step = timed(forward, repeats, device), timed(train_step, repeats, device)
    return {
        "config": name,
        "device": device_name(device),
        "batch": batch,
        "params": sum(p.numel() for p in unet.parameters()),
        "forward_s": fwd,
        "train_step_s": step,
        "steps_per_s": 1 / step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", nargs="+", default=["tiny", "real"], choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the GPU configs (trainer.benchmark)
    rows = [bench(c, args.batch, args.repeats, device) for c in args.configs]
    print(f"device: {device_name(device)}, torch {torch.__version__}")
    print(f"{'config':>6} {'batch':>5} {'params':>11} {'forward s':>10} {'train step s':>13} {'steps/s':>8}")
    for r in rows:
        print(
            f"{r['config']:>6} {r['batch']:>5} {r['params']:>11,} {r['forward_s']:>10.3f} "
            f"{r['train_step_s']:>13.3f} {r['steps_per_s']:>8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
