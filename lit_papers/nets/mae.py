"""MAE: "Masked Autoencoders Are Scalable Vision Learners".

He, Chen, Xie, Li, Dollar, Girshick, CVPR 2022. https://arxiv.org/abs/2111.06377

Mask a random 75% of an image's patches and train an asymmetric autoencoder to reconstruct them. The encoder, a plain
ViT, sees only the visible patches (plus [cls]), so pre-training costs a fraction of a full ViT pass; a light decoder
(512 wide, 8 blocks) receives the encoded visible tokens and a shared, learned mask token at every masked position,
both with fixed sin-cos position embeddings, and predicts each patch's pixels. The loss is the mean squared error on
the masked patches only, against per-patch normalised pixels (`norm_pix_loss`). After pre-training the decoder is
discarded and the encoder (`VisionTransformer` state-dict layout) is fine-tuned or linearly probed.

`MaskedAutoencoderViT` is a `VisionTransformer` without head: it inherits the encoder's parameters and code (patch
embedding, blocks, `norm`, `forward_features` on all patches, used by the online probe) and adds the decoder. Its state
dict is key for key the reference's `models_mae.MaskedAutoencoderViT`, so the released full checkpoints load with
`strict=True`, and with the same weights and random state the loss is the reference's.

Deviations from the paper:
- `norm_pix_loss` defaults to True, the paper's default target (Table 1d); the reference code's default is False.
- Encoder blocks use `scaled_dot_product_attention` (fused kernels); the reference computes softmax(qk^T)v by hand,
  the same function up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_papers.nets.vit import (
    Block,
    VisionTransformer,
    init_vit_weights,
    layer_norm,
    sincos_pos_embed,
)


class MaskedAutoencoderViT(VisionTransformer):
    """Masked autoencoder with a ViT encoder; `forward(imgs, mask_ratio) -> (loss, pred, mask)`.

    Args:
        img_size: side of the square input images.
        patch_size: side of the square patches; each is one token and one reconstruction target.
        in_chans: input channels.
        embed_dim: encoder width.
        depth: encoder blocks.
        num_heads: encoder attention heads.
        decoder_embed_dim: decoder width (512 in the paper).
        decoder_depth: decoder blocks (8 in the paper).
        decoder_num_heads: decoder attention heads (16 in the paper).
        mlp_ratio: MLP hidden width as a multiple of the block width (encoder and decoder).
        norm_pix_loss: regress each patch's pixels normalised by that patch's mean and std (the paper's default).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depth, num_heads, mlp_ratio)
        self.in_chans, self.norm_pix_loss = in_chans, norm_pix_loss
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_pos_embed(decoder_embed_dim, self.patch_embed.grid_size)
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = layer_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)  # pixels of one patch
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_vit_weights(module)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """`(N, C, H, W)` -> `(N, L, P*P*C)`, each row one patch's pixels in (row, column, channel) order."""
        p, g = self.patch_embed.patch_size, self.patch_embed.grid_size
        x = imgs.reshape(imgs.shape[0], self.in_chans, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], g * g, p * p * self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, L, P*P*C)` -> `(N, C, H, W)`; the inverse of `patchify`."""
        p, g = self.patch_embed.patch_size, self.patch_embed.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, self.in_chans)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.in_chans, g * p, g * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random `1 - mask_ratio` of each sample's tokens (per-sample shuffle by argsort of uniform noise).

        Args:
            x: tokens `(N, L, D)`.
            mask_ratio: share of tokens removed; `int(L * (1 - mask_ratio))` are kept.

        Returns:
            the kept tokens `(N, L_keep, D)` in shuffled order; `mask` `(N, L)`, 0 keep, 1 remove, in the original order;
            `ids_restore` `(N, L)`, the permutation that puts the shuffled sequence back in the original order.
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)  # small noise = keep
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (N, L_keep, D)
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # (N, L) back in patch order
        return x_kept, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only: `(N, 1 + L_keep, D)` latent ([cls] first), `mask`, `ids_restore`."""
        x, mask, ids_restore = self.random_masking(self.embed_patches(imgs), mask_ratio)  # (N, L_keep, D)
        return self.forward_tokens(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Fill in mask tokens, unshuffle, decode: `(N, 1 + L_keep, D)` -> predicted patches `(N, L, P*P*C)`."""
        x = self.decoder_embed(latent)  # (N, 1 + L_keep, D_dec)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # (N, L - L_keep, D_dec)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: visible first
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # (N, 1 + L, D_dec)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop [cls]: (N, L, P*P*C)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch mean squared error (visible patches do not count)."""
        target = self.patchify(imgs)  # (N, L, P*P*C)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)  # unbiased var, as reference
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the loss, the predicted patches `(N, L, P*P*C)` and the mask `(N, L)` (1 = masked)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _mae(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


def mae_vit_micro_patch4_32(*, norm_pix_loss: bool = True) -> MaskedAutoencoderViT:
    """MAE for the digits on a CPU: the `vit_micro_patch4_32` encoder and a 64-wide, 2-block, 4-head decoder."""
    return _mae(4, 128, 6, 4, img_size=32, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                norm_pix_loss=norm_pix_loss)


def mae_vit_tiny_patch4_32(*, norm_pix_loss: bool = True) -> MaskedAutoencoderViT:
    """MAE on 32 x 32 images for a CPU: the `vit_tiny_patch4_32` encoder and a 128-wide, 4-block, 4-head decoder."""
    return _mae(4, 192, 12, 3, img_size=32, decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
                norm_pix_loss=norm_pix_loss)


def mae_vit_base_patch16(*, norm_pix_loss: bool = True) -> MaskedAutoencoderViT:
    """MAE with a ViT-B/16 encoder and the paper's 512-wide, 8-block, 16-head decoder."""
    return _mae(16, 768, 12, 12, norm_pix_loss=norm_pix_loss)


def mae_vit_large_patch16(*, norm_pix_loss: bool = True) -> MaskedAutoencoderViT:
    """MAE with a ViT-L/16 encoder and the paper's 512-wide, 8-block, 16-head decoder."""
    return _mae(16, 1024, 24, 16, norm_pix_loss=norm_pix_loss)


def mae_vit_huge_patch14(*, norm_pix_loss: bool = True) -> MaskedAutoencoderViT:
    """MAE with a ViT-H/14 encoder and the paper's 512-wide, 8-block, 16-head decoder."""
    return _mae(14, 1280, 32, 16, norm_pix_loss=norm_pix_loss)
