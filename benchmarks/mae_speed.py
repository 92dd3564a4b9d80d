"""MAE's asymmetric design, timed: encoder on the visible patches only vs encoder on all patches with mask tokens.

He et al. 2022, Table 2: skipping the mask tokens in the encoder makes pre-training 2.8x-4.1x faster in wall-clock time
(3.3x fewer FLOPs for ViT-L). Both variants below share one `MaskedAutoencoderViT` (same weights, decoder and loss);
the baseline replaces the masked patches' embeddings with a learned mask token (plus their position embedding) and
encodes all L tokens, then decodes them as they are. One training step = forward, backward, AdamW step.

    python benchmarks/mae_speed.py                    # ViT-B/16 at 224, mask ratio 0.75
    python benchmarks/mae_speed.py --model small      # ViT-Ti on 4x4 patches of 32x32 images (CPU smoke run)
    python benchmarks/mae_speed.py --model large      # ViT-L/16, the encoder of the paper's Table 2

The ratio grows with the encoder's share of the work: the 8-block decoder is the same for every encoder, so ViT-B gains
less than the paper's ViT-L/H. On a CPU shared with other jobs, OMP_NUM_THREADS=1 gives steadier timings.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn

from lit_papers.nets.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_large_patch16,
    mae_vit_tiny_patch4_32,
)


def loss_with_mask_tokens_in_encoder(model: MaskedAutoencoderViT, enc_mask_token: nn.Parameter, imgs: torch.Tensor,
                                     mask_ratio: float) -> torch.Tensor:
    """The paper's "encoder w/ [M]" baseline: all L tokens through the encoder, masked ones replaced by [M]."""
    x = model.embed_patches(imgs)  # (N, L, D)
    _, mask, _ = model.random_masking(x, mask_ratio)  # same masking rule as the real model
    x = torch.where(mask.bool().unsqueeze(-1), enc_mask_token + model.pos_embed[:, 1:], x)
    y = model.decoder_embed(model.forward_tokens(x)) + model.decoder_pos_embed  # (N, 1 + L, D_dec)
    for block in model.decoder_blocks:
        y = block(y)
    pred = model.decoder_pred(model.decoder_norm(y))[:, 1:]  # (N, L, P*P*C)
    return model.forward_loss(imgs, pred, mask)


def time_interleaved(steps: dict, repeats: int, warmup: int, device: torch.device,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each function in `steps`, called in turn (so load changes on a shared machine hit
    both alike), after `warmup` untimed rounds. `clock=time.process_time` counts this process's CPU time only."""
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(clock() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["base", "large", "small"], default="base")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU or for small, else 4")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (default) or this process's CPU time, steadier on a CPU shared with other jobs")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    builders = {"base": mae_vit_base_patch16, "large": mae_vit_large_patch16, "small": mae_vit_tiny_patch4_32}
    model = builders[args.model]().to(device)
    enc_mask_token = nn.Parameter(torch.zeros(1, 1, model.num_features, device=device))
    nn.init.normal_(enc_mask_token, std=0.02)
    optimizer = torch.optim.AdamW([*model.parameters(), enc_mask_token], lr=1e-4, betas=(0.9, 0.95))
    batch = args.batch_size or (64 if device.type == "cuda" or args.model == "small" else 4)
    size = model.patch_embed.img_size
    imgs = torch.randn(batch, 3, size, size, device=device)

    def train_step(loss_fn) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    visible = lambda: train_step(lambda: model(imgs, args.mask_ratio)[0])  # noqa: E731
    all_tokens = lambda: train_step(lambda: loss_with_mask_tokens_in_encoder(model, enc_mask_token, imgs, args.mask_ratio))  # noqa: E731
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = time_interleaved({"visible": visible, "all": all_tokens}, args.steps, args.warmup, device, clock)
    t_visible, t_all = times["visible"], times["all"]
    name = {"base": "MAE ViT-B/16, 224px", "large": "MAE ViT-L/16, 224px", "small": "MAE ViT-Ti/4, 32px"}[args.model]
    print(f"{name}, batch {batch}, mask ratio {args.mask_ratio}, {device.type}, {args.steps} timed steps")
    print(f"  encoder on visible patches only: {t_visible * 1000:9.1f} ms/step")
    print(f"  encoder on all patches + [M]:     {t_all * 1000:9.1f} ms/step")
    print(f"  speed-up: {t_all / t_visible:.2f}x  (paper, Table 2: 2.8x-4.1x)")


if __name__ == "__main__":
    main()
