#!/usr/bin/env python
"""Training-step cost of DUAL-NET variants on this CPU (not a test): the number that decides the
design when training has a fixed CPU budget.

One optimiser step (forward, MSE backward, Adam) on a batch of 16 patches of 64^2 for each
variant, fp32 vs bf16 autocast and channels-last vs contiguous; the median of ``--steps`` timed
steps after two warm-up steps, with ``--threads`` torch threads. Also the inference cost of one
128^2 slice (batch of 16, no gradient).

    python benchmarks/bench_train_step.py [--threads 1] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import machine


def step_seconds(model, channels: int, *, bf16: bool, channels_last: bool, steps: int) -> float:
    """Median seconds of one training step (batch 16 of 64^2)."""
    import torch

    x = torch.rand(16, channels, 64, 64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)["out"]
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def infer_ms(model, channels: int, steps: int) -> float:
    """Milliseconds per 128^2 slice at inference (batch 16, channels-last, fp32)."""
    import torch

    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.rand(16, channels, 128, 128).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(steps + 1):
            t = time.perf_counter()
            model(x)
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times) / 16 * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows (slow on AVX2-only CPUs; fast with AVX-512 BF16 / AMX)")
    args = ap.parse_args()
    import torch

    from dualnet.models import build_model, count_parameters

    torch.set_num_threads(args.threads)
    variants = [
        ("v2 shipped: tiny 2D, blind to the level", dict(preset="tiny")),
        ("cpu 2D + noise map + NEB", dict(preset="cpu", noise_map=True, dropout_mode="channel", use_nonlocal=False)),
        ("cpu 2.5D + map + NEB + attention", dict(preset="cpu", context=5, noise_map=True, dropout_mode="channel")),
        ("cpu 2.5D + map + NEB (v3 shipped)", dict(preset="cpu", context=5, noise_map=True, dropout_mode="channel",
                                                  use_nonlocal=False)),
        ("cpu 2.5D + map, no NEB", dict(preset="cpu", context=5, noise_map=True, dropout_mode="channel",
                                        use_nonlocal=False, use_neb=False)),
        ("cpu 2.5D + map + NEB, voxel dropout", dict(preset="cpu", context=5, noise_map=True, use_nonlocal=False)),
        ("cpu 2.5D + map + NEB, blocks [1, 2, 3, 4] (deepened)", dict(
            preset="cpu", context=5, noise_map=True, dropout_mode="channel", use_nonlocal=False, blocks=[1, 2, 3, 4])),
    ]
    print(f"machine: {machine()}; torch threads {args.threads}; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| variant | parameters | s/step fp32 channels-last | s/step fp32 contiguous | "
          + ("s/step bf16 channels-last | " if not args.no_bf16 else "") + "ms per 128^2 slice (inference) |")
    print("|---|---|---|---|" + ("---|" if not args.no_bf16 else "") + "---|")
    for name, kw in variants:
        torch.manual_seed(0)
        model = build_model(dim=2, **kw)
        ch = model.input_channels
        cells = [name, str(count_parameters(model)),
                 f"{step_seconds(model, ch, bf16=False, channels_last=True, steps=args.steps):.3f}",
                 f"{step_seconds(build_model(dim=2, **kw), ch, bf16=False, channels_last=False, steps=args.steps):.3f}"]
        if not args.no_bf16:
            cells.append(f"{step_seconds(build_model(dim=2, **kw), ch, bf16=True, channels_last=True, steps=max(2, args.steps // 2)):.3f}")
        cells.append(f"{infer_ms(model, ch, args.steps):.1f}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
