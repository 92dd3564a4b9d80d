"""ViT and MAE nets against the official checkpoint layout, timm's ViT and a hand-written MAE reference (CPU, tiny)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from lit_papers.nets.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch4_32,
)
from lit_papers.nets.vit import (
    VisionTransformer,
    load_mae_encoder,
    sincos_pos_embed,
    vit_base_patch16,
    vit_from_mae_checkpoint,
    vit_huge_patch14,
    vit_large_patch16,
    vit_tiny_patch4_32,
)

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)  # 16 patches
TINY_DEC = dict(decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3)
BLOCK_KEYS = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]


def block_shapes(dim: int) -> dict[str, tuple]:
    shapes = {"attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim),
              "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim)}
    return {k: shapes.get(k, (dim,)) for k in BLOCK_KEYS}


def official_mae_layout(patch: int, dim: int, depth: int, dec: int = 512, dec_depth: int = 8, img: int = 224) -> dict:
    """Key -> shape of the reference models_mae.MaskedAutoencoderViT (paper appendix A.1, reference code)."""
    n = (img // patch) ** 2 + 1
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, n, dim), "patch_embed.proj.weight": (dim, 3, patch, patch),
            "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
            "decoder_embed.weight": (dec, dim), "decoder_embed.bias": (dec,), "mask_token": (1, 1, dec),
            "decoder_pos_embed": (1, n, dec), "decoder_norm.weight": (dec,), "decoder_norm.bias": (dec,),
            "decoder_pred.weight": (patch * patch * 3, dec), "decoder_pred.bias": (patch * patch * 3,)}
    keys |= {f"blocks.{i}.{k}": s for i in range(depth) for k, s in block_shapes(dim).items()}
    keys |= {f"decoder_blocks.{i}.{k}": s for i in range(dec_depth) for k, s in block_shapes(dec).items()}
    return keys


def shapes(net: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("build, patch, dim, depth", [
    (mae_vit_base_patch16, 16, 768, 12), (mae_vit_large_patch16, 16, 1024, 24), (mae_vit_huge_patch14, 14, 1280, 32)])
def test_mae_state_dict_is_the_official_layout(build, patch, dim, depth):
    with torch.device("meta"):  # shapes only: no memory, no init time
        net = build()
    assert shapes(net) == official_mae_layout(patch, dim, depth)


@pytest.mark.parametrize("ours, timm_name", [
    (vit_base_patch16, "vit_base_patch16_224"), (vit_large_patch16, "vit_large_patch16_224"),
    (vit_huge_patch14, "vit_huge_patch14_224")])
def test_vit_state_dict_matches_timm(ours, timm_name):
    with torch.device("meta"):
        mine, reference = ours(), timm.create_model(timm_name, pretrained=False, num_classes=1000)
        pooled = ours(global_pool=True)
        reference_pooled = timm.create_model(timm_name, pretrained=False, num_classes=1000, global_pool="avg")
    assert shapes(mine) == shapes(reference)
    assert shapes(pooled) == shapes(reference_pooled)  # fc_norm instead of norm


def test_mae_encoder_file_loads_into_vit_with_only_head_and_fc_norm_missing(tmp_path):
    mae = MaskedAutoencoderViT(**TINY, **TINY_DEC)
    official = {k: v for k, v in mae.state_dict().items() if not k.startswith("decoder_") and k != "mask_token"}
    torch.save({"model": official}, tmp_path / "mae_pretrain_vit_tiny.pth")  # the released encoder-only format
    for global_pool, missing in ((True, {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}),
                                 (False, {"head.weight", "head.bias"})):
        vit = VisionTransformer(**TINY, num_classes=5, global_pool=global_pool)
        assert set(load_mae_encoder(vit, tmp_path / "mae_pretrain_vit_tiny.pth")) == missing
        torch.testing.assert_close(vit.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    mae.load_state_dict(torch.load(tmp_path / "mae_pretrain_vit_tiny.pth")["model"] | {
        k: v for k, v in mae.state_dict().items() if k.startswith("decoder_") or k == "mask_token"}, strict=True)
    with pytest.raises(RuntimeError, match="missing"):  # a file of another architecture does not load silently
        load_mae_encoder(VisionTransformer(**{**TINY, "depth": 3}), {"model": official})


def test_pos_embed_is_resized_for_another_resolution():
    state = {"model": {k: v for k, v in VisionTransformer(**TINY).state_dict().items() if not k.startswith("head")}}
    net = VisionTransformer(**{**TINY, "img_size": 48}, num_classes=0)  # 6 x 6 grid instead of 4 x 4
    load_mae_encoder(net, state)
    assert net.pos_embed.shape == (1, 37, 32)


def test_sincos_table_follows_the_mae_layout():
    dim, grid = 16, 3
    table = sincos_pos_embed(dim, grid)[0]  # (1 + 9, 16)
    assert torch.equal(table[0], torch.zeros(dim))
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            for k in range(quarter):
                w = 1.0 / 10000 ** (k / quarter)
                expect = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
                got = table[1 + row * grid + col, [k, k + quarter, 2 * quarter + k, 3 * quarter + k]]
                torch.testing.assert_close(got, torch.tensor(expect), atol=1e-6, rtol=0)


@pytest.mark.parametrize("global_pool", [False, True])
def test_vit_is_timm_vit_given_the_same_weights(global_pool):
    torch.manual_seed(0)
    reference = TimmViT(**TINY, num_classes=7, global_pool="avg" if global_pool else "token",
                        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()
    ours = VisionTransformer(**TINY, num_classes=7, global_pool=global_pool).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True), atol=1e-5, rtol=1e-5)


def test_vit_interface_and_drop_path():
    with torch.device("meta"):
        tiny = vit_tiny_patch4_32()
    assert tiny.num_features == 192 and tiny.patch_embed.num_patches == 64 and tiny.num_classes == 10
    net = VisionTransformer(**TINY, num_classes=10, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    assert net(x).shape == (4, 10) and net.num_features == 32
    assert net.forward_features(x).shape == (4, 17, 32)
    assert not torch.equal(net(x), net(x)), "drop path is random in training"
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    net.reset_classifier(3)
    assert net(x).shape == (4, 3)
    assert not net.pos_embed.requires_grad


def explicit_patches(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Patch (r, c) of each image as its (p, p, C) pixel block flattened, patches in row-major order: (N, L, p*p*C)."""
    g = imgs.shape[-1] // p
    return torch.stack([torch.stack([img[:, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).flatten()
                                     for r in range(g) for c in range(g)]) for img in imgs])


def reference_mae_forward(mae: MaskedAutoencoderViT, imgs: torch.Tensor, ratio: float, seed: int):
    """The paper's algorithm written out with timm's transformer blocks, from the net's weights."""
    p = mae.patch_embed.patch_size
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    enc = TimmViT(**TINY, num_classes=0, norm_layer=norm)
    enc.load_state_dict({k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))})
    dec = nn.ModuleList(TimmBlock(24, 3, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(2))
    dec.load_state_dict({k[len("decoder_blocks."):]: v for k, v in mae.state_dict().items() if k.startswith("decoder_blocks.")})
    n, length = imgs.shape[0], mae.patch_embed.num_patches
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    torch.manual_seed(seed)
    ids_shuffle = torch.argsort(torch.rand(n, length), dim=1)
    keep = int(length * (1 - ratio))
    x = torch.stack([x[i, ids_shuffle[i, :keep]] for i in range(n)])
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(n, -1, -1), x], dim=1)
    x = enc.norm(enc.blocks(x))
    y = mae.decoder_embed(x)
    full = mae.mask_token.expand(n, length, -1).clone()
    for i in range(n):
        full[i, ids_shuffle[i, :keep]] = y[i, 1:]
    y = torch.cat([y[:, :1], full], dim=1) + mae.decoder_pos_embed
    for block in dec:
        y = block(y)
    pred = mae.decoder_pred(mae.decoder_norm(y))[:, 1:]
    mask = torch.ones(n, length)
    for i in range(n):
        mask[i, ids_shuffle[i, :keep]] = 0
    target = explicit_patches(imgs, p)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    loss = sum(((pred[i, j] - target[i, j]) ** 2).mean() for i in range(n) for j in range(length) if mask[i, j]) / mask.sum()
    return loss, pred, mask


def test_mae_forward_equals_the_reference_algorithm():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**TINY, **TINY_DEC, norm_pix_loss=True).eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref_loss, ref_pred, ref_mask = reference_mae_forward(mae, imgs, 0.75, seed=7)
        torch.manual_seed(7)
        loss, pred, mask = mae(imgs, mask_ratio=0.75)
    assert mask.sum(1).tolist() == [12.0] * 3  # 16 patches, int(16 * 0.25) = 4 kept
    torch.testing.assert_close(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mae.patchify(imgs), explicit_patches(imgs, 8))
    torch.testing.assert_close(mae.unpatchify(mae.patchify(imgs)), imgs)


def test_norm_pix_off_regresses_raw_pixels_and_loss_ignores_visible_patches():
    torch.manual_seed(0)
    mae = mae_vit_tiny_patch4_32(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 64, 48)
    mask = (torch.rand(2, 64) < 0.75).float()
    target = mae.patchify(imgs)
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(mae.forward_loss(imgs, pred, mask), expected)
    pred_visible_changed = pred + (1 - mask).unsqueeze(-1) * 100.0
    torch.testing.assert_close(mae.forward_loss(imgs, pred_visible_changed, mask), expected)


def test_mae_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**TINY, **TINY_DEC)
    mae(torch.randn(2, 3, 32, 32))[0].backward()
    for name, p in mae.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert {n for n, p in mae.named_parameters() if not p.requires_grad} == {"pos_embed", "decoder_pos_embed"}


def test_vit_from_mae_checkpoint_builds_the_named_size():
    net = vit_from_mae_checkpoint(None, arch="vit_tiny_patch4_32", num_classes=0, global_pool=False)
    assert net.num_features == 192 and len(net.blocks) == 12 and net.patch_embed.patch_size == 4
    with pytest.raises(ValueError, match="unknown arch"):
        vit_from_mae_checkpoint(None, arch="vit_giant")
