"""Our ResNet-50 and ViT-B/16 against torchvision's ResNet-50 and timm's ViT-B/16: forward + backward, in one process.

    python benchmarks/nets_speed.py                                   # both pairs, batch 2 on CPU, 32 on a GPU
    python benchmarks/nets_speed.py --net vit_b16 --batch 8 --repeats 10
    python benchmarks/nets_speed.py --device cuda --batch 128 --bf16 --channels-last --compile

Each pair is checked first: the same parameter count, then the reference's weights are loaded into ours (the state
dicts share their keys) and the two forward passes on the benchmark batch compared, so both nets do the same math on
the same numbers. One timed call = forward, cross-entropy against random labels, backward, gradients set to None (no
optimizer step: it is the same for both). `--bf16` runs the forward pass under bfloat16 autocast, `--channels-last`
puts both nets and the input batch in NHWC layout, `--compile` wraps both in `torch.compile`; the options always apply
to both nets alike. The two nets alternate for `--warmup` untimed and `--repeats` timed rounds and each reports its
median (`time_interleaved` of benchmarks/mae_speed.py), so load from other processes on a shared machine hits both
alike. Goal: ours / reference >= 0.97 images/s. Our ViT's fixed sin-cos position embedding is made trainable here,
as timm's learned one is, so both backward passes compute the same gradients.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import timm
import torch
import torch.nn.functional as F
import torchvision
from mae_speed import time_interleaved
from torch import nn

from lit_papers.nets.resnet import resnet50
from lit_papers.nets.vit import vit_base_patch16


def vit_b16() -> nn.Module:
    net = vit_base_patch16()
    net.pos_embed.requires_grad_(True)  # timm learns its position embedding: give both the same backward work
    return net


# name -> (label, our builder, reference builder)
PAIRS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "resnet50": ("ResNet-50 (ours vs torchvision)", resnet50, torchvision.models.resnet50),
    "vit_b16": ("ViT-B/16 (ours vs timm vit_base_patch16_224)", vit_b16,
                lambda: timm.create_model("vit_base_patch16_224", pretrained=False)),
}


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def make_step(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, bf16: bool,
              compile: bool) -> Callable[[], None]:
    """One forward + backward of `net` (compiled or not) on the batch; gradients are dropped afterwards."""
    model = torch.compile(net) if compile else net

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)  # (B, 1000)
        F.cross_entropy(logits.float(), targets).backward()
        net.zero_grad(set_to_none=True)

    return step


def benchmark(name: str, batch: int, device: torch.device, bf16: bool, channels_last: bool, compile: bool,
              warmup: int, repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Check the pair, time it; returns images/s of "ours" and "reference" (medians) and the outputs' max |diff|."""
    _, build_ours, build_ref = PAIRS[name]
    torch.manual_seed(0)
    ours, ref = build_ours().to(device), build_ref().to(device)
    if num_params(ours) != num_params(ref):
        raise SystemExit(f"{name}: {num_params(ours):,} parameters in ours but {num_params(ref):,} in the reference")
    ours.load_state_dict(ref.state_dict())  # same weights, so the forward passes can be compared number for number
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ours, ref = ours.to(memory_format=memory_format), ref.to(memory_format=memory_format)
    images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():  # in eval mode, so BatchNorm uses the same (running) statistics in both
        max_diff = (ours.eval()(images) - ref.eval()(images)).abs().max().item()
    ours.train()
    ref.train()
    steps = {key: make_step(net, images, targets, bf16, compile) for key, net in (("ours", ours), ("reference", ref))}
    seconds = time_interleaved(steps, repeats, warmup, device, clock)
    return {key: batch / s for key, s in seconds.items()} | {"max_diff": max_diff, "params": num_params(ours)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Parse `argv`, run the benchmark, print one block per pair; returns {pair: {"ours", "reference", ...}}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=[*PAIRS, "both"], default="both")
    parser.add_argument("--batch", type=int, help="batch size (default: 32 on a GPU, 2 on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in the forward pass")
    parser.add_argument("--channels-last", action="store_true", help="NHWC nets and input batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile both nets (minutes on a CPU)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (default) or this process's CPU time, steadier on a CPU shared with other jobs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median counts")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu times CPU work only; GPU runs need --clock wall")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    batch = args.batch or (32 if device.type == "cuda" else 2)
    flags = [f for f, on in (("bf16 autocast", args.bf16), ("channels_last", args.channels_last),
                             ("compiled", args.compile)) if on] or ["fp32"]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, {device.type}, "
          f"{torch.get_num_threads()} threads; batch {batch}, {', '.join(flags)}; forward + backward, "
          f"{args.clock} clock, median of {args.repeats} alternating rounds after {args.warmup} warm-up")
    results = {}
    for name in PAIRS if args.net == "both" else [args.net]:
        r = benchmark(name, batch, device, args.bf16, args.channels_last, args.compile, args.warmup, args.repeats,
                      clock)
        print(f"{PAIRS[name][0]}: {r['params']:,} parameters each, same weights -> outputs differ by at most "
              f"{r['max_diff']:.1e}")
        print(f"  ours       {r['ours']:9.2f} img/s")
        print(f"  reference  {r['reference']:9.2f} img/s")
        print(f"  ratio ours / reference: {r['ours'] / r['reference']:.3f}  (goal >= 0.97)")
        results[name] = r
    return results


if __name__ == "__main__":
    main()
