"""Vision Transformer: "An Image is Worth 16x16 Words", as the encoder of "Masked Autoencoders Are Scalable Vision Learners".

Dosovitskiy et al., ICLR 2021, https://arxiv.org/abs/2010.11929; He et al., CVPR 2022, https://arxiv.org/abs/2111.06377

An image is cut into non-overlapping P x P patches, each linearly embedded (a stride-P conv); a learnable [cls] token is
prepended and a position embedding added; a stack of pre-norm transformer blocks (LN -> multi-head self-attention ->
residual, LN -> GELU MLP -> residual) mixes the tokens. The classifier reads either the [cls] token after a final LN, or
(MAE fine-tuning) the average of the patch tokens followed by a LN called `fc_norm`. Parameter names are timm's and the
MAE release's (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`,
`norm`, `fc_norm`, `head`), so `timm` ViT state dicts and the official `mae_pretrain_vit_*.pth` files load directly.

Deviations from the paper:
- Position embeddings are MAE's fixed 2-D sin-cos (not ViT's learned 1-D ones); `pos_embed_trainable=True` lets
  fine-tuning update them, as the MAE reference fine-tuning code (a timm ViT) does.
- Init follows MAE (xavier-uniform Linear layers and patch projection, N(0, 0.02) [cls] token); the head starts at
  trunc-normal std 2e-5, MAE's fine-tuning head init. The sin-cos table is computed in float64 then rounded, so a fresh
  model's `pos_embed` can differ from the reference's float32 table in the last bit (loaded checkpoints carry theirs).
- LayerNorm eps is 1e-6 (the JAX/MAE value), not torch's 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding `(1, 1 + grid_size**2, embed_dim)`; the [cls] row is zeros.

    The first half of the channels encodes a patch's column, the second half its row, each as
    `[sin(pos * w_k), cos(pos * w_k)]` with `w_k = 10000 ** (-k / (embed_dim / 4))`: the MAE (MoCo v3) layout, so the
    table equals the `pos_embed` stored in published MAE checkpoints.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G): patch index = row * G + col

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (G*G, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (G*G, D/2)

    table = torch.cat([encode(cols), encode(rows)], dim=1)  # (G*G, D)
    table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table])  # (1 + G*G, D)
    return table.float().unsqueeze(0)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability `rate` (scaled to keep the mean)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class PatchEmbed(nn.Module):
    """Split `(B, C, H, W)` into P x P patches and project each to `embed_dim`: `(B, (H/P) * (W/P), embed_dim)`."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, G, G) -> (B, L, D), L = G*G in row-major order


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, c/h)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(c/h)) v: (B, h, N, c/h)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as in ViT and timm
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (ViT eqs. 2-3): `x + attn(LN(x))`, then `x + mlp(LN(x))`, each branch drop-pathed."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, N, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """MAE's init (from the JAX ViT): xavier-uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):  # the patch projection is a Linear on flattened patches, so init it like one
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))


class VisionTransformer(nn.Module):
    """ViT classifier with the timm interface (`forward_features`, `forward_head`, `reset_classifier`, `num_features`).

    Args:
        img_size: side of the square input images.
        patch_size: side of the square patches (16 for ViT-B/16).
        in_chans: input channels.
        num_classes: width of the linear head (0: no head, `forward` returns the pooled features).
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of `embed_dim`.
        drop_path_rate: stochastic depth rate of the last block, rising linearly from 0 over the blocks.
        global_pool: classify from the mean of the patch tokens + `fc_norm` (MAE fine-tuning), instead of from the
            [cls] token after the final `norm` (ViT, MAE linear probing).
        pos_embed_trainable: let the optimizer update the sin-cos position embedding (MAE fine-tuning code does).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_pool: bool = False,
        pos_embed_trainable: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes, self.num_features, self.global_pool = num_classes, embed_dim, global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_pos_embed(embed_dim, self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(pos, requires_grad=pos_embed_trainable)  # a parameter so checkpoints carry it
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 for the first block, linear up
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop_path=r) for r in rates)
        # With global pooling the final LN moves after the pooling (timm/MAE drop `norm` and add `fc_norm`).
        self.norm = nn.Identity() if global_pool else layer_norm(embed_dim)
        self.fc_norm = layer_norm(embed_dim) if global_pool else nn.Identity()
        self.head = nn.Identity()
        init_vit_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        self.reset_classifier(num_classes)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, without the [cls] token: `(B, L, D)`."""
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the [cls] token to any subset of patch tokens `(B, L', D)` and run the blocks: `(B, 1 + L', D)`."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> all tokens after the blocks, `(B, 1 + L, D)` ([cls] first)."""
        return self.forward_tokens(self.embed_patches(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens to `(B, D)` ([cls] or mean of patches + fc_norm); `pre_logits` stops before the head."""
        x = self.fc_norm(x[:, 1:].mean(dim=1) if self.global_pool else x[:, 0])  # (B, D)
        return x if pre_logits else self.head(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh `num_classes`-way layer (0 -> identity), MAE fine-tuning's init."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)


# Named sizes: (patch_size, embed_dim, depth, num_heads, img_size). The 32 x 32 ones are for digits/CIFAR on a CPU.
VIT_ARCHS = {
    "vit_micro_patch4_32": (4, 128, 6, 4, 32),
    "vit_tiny_patch4_32": (4, 192, 12, 3, 32),
    "vit_base_patch16": (16, 768, 12, 12, 224),
    "vit_large_patch16": (16, 1024, 24, 16, 224),
    "vit_huge_patch14": (14, 1280, 32, 16, 224),
}


def _build(arch: str, **kwargs) -> VisionTransformer:
    patch_size, embed_dim, depth, num_heads, img_size = VIT_ARCHS[arch]
    kwargs.setdefault("img_size", img_size)
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


def vit_micro_patch4_32(*, num_classes: int = 10, global_pool: bool = False, drop_path_rate: float = 0.0) -> VisionTransformer:
    """A ViT small enough to pre-train on a CPU in minutes: 4 x 4 patches of 32 x 32 images, width 128, 6 blocks, 4 heads."""
    return _build("vit_micro_patch4_32", num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)


def vit_tiny_patch4_32(*, num_classes: int = 10, global_pool: bool = False, drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-Ti at 32 x 32 with 4 x 4 patches (64 tokens): width 192, 12 blocks, 3 heads (DeiT-Ti sizes)."""
    return _build("vit_tiny_patch4_32", num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)


def vit_base_patch16(*, num_classes: int = 1000, global_pool: bool = False, drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-B/16: width 768, 12 blocks, 12 heads, 86M parameters with a 1000-way head."""
    return _build("vit_base_patch16", num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)


def vit_large_patch16(*, num_classes: int = 1000, global_pool: bool = False, drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-L/16: width 1024, 24 blocks, 16 heads."""
    return _build("vit_large_patch16", num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)


def vit_huge_patch14(*, num_classes: int = 1000, global_pool: bool = False, drop_path_rate: float = 0.0) -> VisionTransformer:
    """ViT-H/14: width 1280, 32 blocks, 16 heads."""
    return _build("vit_huge_patch14", num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize a `(1, 1 + G*G, D)` position table to `grid_size` (bicubic on the patch rows; the [cls] row is kept)."""
    old = int((pos_embed.shape[1] - 1) ** 0.5)
    if old == grid_size:
        return pos_embed
    patches = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
    patches = F.interpolate(patches.float(), size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def encoder_state_dict(checkpoint: str | Path | dict) -> dict[str, torch.Tensor]:
    """The encoder weights in a pre-training checkpoint, with timm/MAE key names.

    Accepts an official MAE file (`{"model": state_dict}`), a Lightning checkpoint of `MAEPretraining` or of a classifier
    (`{"state_dict": ...}` with `net.` prefixes), or a bare state dict. Decoder keys and `mask_token` are dropped.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True) if isinstance(checkpoint, (str, Path)) else checkpoint
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if any(k.startswith("net.") for k in state):  # a Lightning task's state dict: the net's keys sit under "net."
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    return {k: v for k, v in state.items() if not k.startswith("decoder_") and k != "mask_token"}


def load_mae_encoder(net: VisionTransformer, checkpoint: str | Path | dict) -> list[str]:
    """Load pre-trained encoder weights into `net`; return the keys left at their init (head and fc_norm only).

    A head whose shape differs from `net`'s is dropped and the position table is resized to `net`'s grid, as in the
    reference fine-tuning code. Any other missing or unexpected key raises, so a wrong file cannot load silently.
    """
    state = encoder_state_dict(checkpoint)
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], net.patch_embed.grid_size)
    own = net.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("head.") and k in own and v.shape != own[k].shape)}
    if net.global_pool:  # the encoder's final LN is replaced by fc_norm after pooling (timm/MAE fine-tuning)
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if bad_missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the net: missing {bad_missing}, unexpected {unexpected}")
    return missing


def vit_from_mae_checkpoint(
    checkpoint: str | None = None,
    arch: str = "vit_base_patch16",
    num_classes: int = 1000,
    global_pool: bool = True,
    drop_path_rate: float = 0.0,
    pos_embed_trainable: bool = False,
) -> VisionTransformer:
    """Build a ViT of a named size and load a pre-trained MAE encoder into it: the net of the fine-tune/probe recipes.

    Args:
        checkpoint: official `mae_pretrain_vit_*.pth`, or a Lightning checkpoint of `MAEPretraining`; `None` keeps the
            random init (the baseline every probe is compared against).
        arch: a key of `VIT_ARCHS`, e.g. "vit_base_patch16" or "vit_tiny_patch4_32".
        num_classes: head width (0: no head).
        global_pool: average-pool + fc_norm (fine-tuning) or [cls] token after `norm` (linear probing).
        drop_path_rate: stochastic depth (0.1 for ViT-B fine-tuning).
        pos_embed_trainable: update the position table during fine-tuning, as the reference code does.
    """
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(VIT_ARCHS)}")
    net = _build(arch, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate,
                 pos_embed_trainable=pos_embed_trainable)
    if checkpoint is not None:
        load_mae_encoder(net, checkpoint)
    return net
