"""Transformer: "Attention Is All You Need" (Vaswani et al., NIPS 2017), https://arxiv.org/abs/1706.03762

An encoder-decoder built only from attention and position-wise feed-forward layers. Tokens are embedded (the weights
multiplied by sqrt(d_model)) and summed with fixed sinusoidal position encodings. Each of the N encoder layers applies
multi-head self-attention, then a ReLU MLP of width d_ff; each of the N decoder layers applies causal self-attention,
attention over the encoder's output ("cross-attention"), then the MLP. Every sub-layer is wrapped as
`LayerNorm(x + Dropout(sublayer(x)))` (post-norm, sec. 5.4). Source, target embeddings and the pre-softmax projection
share one matrix when the vocabulary is shared (sec. 3.4). Decoding is incremental: `start_decoding` caches the
cross-attention keys/values once, and `decode_step` appends each new position's self-attention keys/values to a cache,
so a step costs O(t) instead of re-running the whole prefix.

The attention is this file's own rather than `lit_papers.nets.vit.Attention`: that block fuses q, k and v into one
projection of a single sequence, takes no mask and keeps no cache, while the decoder needs queries and keys from
different sequences (cross-attention), a source padding mask, causal masking with a key/value cache, and the paper's
ReLU MLP and LayerNorm eps 1e-5 instead of the ViT's GELU and 1e-6.

Deviations from the paper:
- Initialisation is not given in the paper; here Linear weights are xavier-uniform with zero biases (tensor2tensor)
  and embeddings N(0, d_model^-0.5), so the sqrt(d_model)-scaled embeddings start at unit variance (t2t, fairseq).
- The pre-softmax projection is the (tied) target embedding matrix with no bias.
- `transformer_base` has 63.1M parameters with a 37k shared vocabulary; the paper's Table 3 lists 65M without saying
  how it counted.
- `norm_first=True` (pre-norm: `x + Dropout(sublayer(LayerNorm(x)))`, plus a final LayerNorm after each stack) is not
  in the paper; it is the later tensor2tensor default and trains more stably without warm-up (Xiong et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (B, h, T, d_model / h)


def sinusoidal_table(num_positions: int, d_model: int) -> torch.Tensor:
    """Sec. 3.5: `PE[pos, 2i] = sin(pos / 10000^(2i/d_model))`, `PE[pos, 2i+1] = cos(...)`: (num_positions, d_model)."""
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (D/2,)
    table = torch.zeros(num_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


class MultiHeadAttention(nn.Module):
    """`softmax(q k^T / sqrt(d_k)) v` over `num_heads` heads (sec. 3.2.2). Keys/values are projected by `keys_values`
    separately from the queries, so the decoder can cache them and attend from a different sequence."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)  # W^K and W^V in one matmul
        self.out_proj = nn.Linear(d_model, d_model)

    def keys_values(self, x: torch.Tensor) -> KV:
        b, s, d = x.shape
        kv = self.kv_proj(x).view(b, s, 2, self.num_heads, d // self.num_heads)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2, B, h, S, d_k)
        return kv[0], kv[1]

    def forward(
        self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """Attend from `x` (B, T, D) to `kv`; `mask` (B, 1, 1, S) is True where a key may be attended (not padding).

        `causal` lets query t see keys up to its own position, counted from the end: the last T of the S keys are
        the queries' own positions (S > T when earlier positions come from a cache).
        """
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, h, T, d_k)
        k, v = kv
        s = k.shape[2]
        is_causal = causal and t == s and t > 1  # SDPA's own causal mask is aligned top-left, so only for T == S
        if causal and t < s and t > 1:  # a block of new positions after a cached prefix
            future = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)  # (T, S)
            mask = future if mask is None else mask & future
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, h, T, d_k)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class FeedForward(nn.Sequential):
    """`max(0, x W1 + b1) W2 + b2` (sec. 3.3)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))


class _Residual(nn.Module):
    """Shared by both layer types: where the LayerNorm sits around each sub-layer, and the residual dropout."""

    def __init__(self, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def pre(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x) if self.norm_first else x  # the sub-layer's input

    def post(self, x: torch.Tensor, out: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        x = x + self.dropout(out)  # dropout on each sub-layer's output before the residual sum (sec. 5.4)
        return x if self.norm_first else norm(x)


class EncoderLayer(_Residual):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, norm_first: bool) -> None:
        super().__init__(dropout, norm_first)
        self.self_attn, self.norm1 = MultiHeadAttention(d_model, num_heads), nn.LayerNorm(d_model)
        self.ffn, self.norm2 = FeedForward(d_model, d_ff), nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.pre(x, self.norm1)
        x = self.post(x, self.self_attn(h, self.self_attn.keys_values(h), mask), self.norm1)  # (B, S, D)
        return self.post(x, self.ffn(self.pre(x, self.norm2)), self.norm2)


class DecoderLayer(_Residual):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, norm_first: bool) -> None:
        super().__init__(dropout, norm_first)
        self.self_attn, self.norm1 = MultiHeadAttention(d_model, num_heads), nn.LayerNorm(d_model)
        self.cross_attn, self.norm2 = MultiHeadAttention(d_model, num_heads), nn.LayerNorm(d_model)
        self.ffn, self.norm3 = FeedForward(d_model, d_ff), nn.LayerNorm(d_model)

    def forward(
        self, y: torch.Tensor, memory_kv: KV, memory_mask: torch.Tensor, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        """`y` (B, T, D): the new target positions; `past`: self-attention keys/values of the earlier ones.

        Returns the layer's output and the self-attention keys/values of all positions so far (the next cache).
        """
        h = self.pre(y, self.norm1)
        k, v = self.self_attn.keys_values(h)  # (B, h, T, d_k)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, h, t_past + T, d_k)
        y = self.post(y, self.self_attn(h, (k, v), causal=True), self.norm1)
        y = self.post(y, self.cross_attn(self.pre(y, self.norm2), memory_kv, memory_mask), self.norm2)
        return self.post(y, self.ffn(self.pre(y, self.norm3)), self.norm3), (k, v)


@dataclass
class DecoderState:
    """What incremental decoding carries between steps, for B sequences (B = sentences x beams in beam search)."""

    memory_kv: list[KV]  # per decoder layer: cross-attention keys/values of the encoder output, computed once
    memory_mask: torch.Tensor  # (B, 1, 1, S), True on real source tokens
    self_kv: list[KV | None] = field(default_factory=list)  # per decoder layer: keys/values of the target so far
    length: int = 0  # target positions decoded so far (the next position's index)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',): beam search's surviving hypotheses, each carrying its parent's cache."""
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.self_kv]
        self.memory_kv = [(k[index], v[index]) for k, v in self.memory_kv]
        self.memory_mask = self.memory_mask[index]


class Transformer(nn.Module):
    """The encoder-decoder Transformer; `forward(src, tgt_in)` returns next-token logits `(B, T, tgt_vocab_size)`.

    Args:
        src_vocab_size: source vocabulary size (the whole vocabulary when it is shared).
        tgt_vocab_size: target vocabulary size; `None` shares the source vocabulary and ties source embedding, target
            embedding and output projection into one matrix (the paper's EN-DE setup). With separate vocabularies the
            target embedding and the output projection are still tied.
        d_model: width of every token representation.
        num_heads: attention heads (h); `d_model / num_heads` dimensions each.
        num_encoder_layers: encoder layers (N).
        num_decoder_layers: decoder layers (N).
        d_ff: hidden width of the position-wise feed-forward layers.
        dropout: residual and embedding dropout (P_drop; 0.1 for base).
        norm_first: pre-norm layers instead of the paper's post-norm.
        pad_id: padding token: never attended to, ignored by the loss.
        bos_id: token that starts every target sequence (the decoder's first input).
        eos_id: token that ends every sequence.
        max_positions: longest sequence the position table covers.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int | None = None,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        norm_first: bool = False,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        max_positions: int = 1024,
    ) -> None:
        super().__init__()
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size or src_vocab_size
        self.d_model, self.pad_id, self.bos_id, self.eos_id = d_model, pad_id, bos_id, eos_id
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = self.src_embed if tgt_vocab_size is None else nn.Embedding(tgt_vocab_size, d_model)
        self.register_buffer("pos_table", sinusoidal_table(max_positions, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer_args = (d_model, num_heads, d_ff, dropout, norm_first)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        # Post-norm layers end in a LayerNorm already; pre-norm stacks need one after the last residual sum.
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=self.d_model**-0.5)

    def _embed(self, tokens: torch.Tensor, embedding: nn.Embedding, start: int = 0) -> torch.Tensor:
        end = start + tokens.shape[1]
        if end > self.pos_table.shape[0]:
            raise ValueError(f"sequence of {end} tokens is longer than max_positions={self.pos_table.shape[0]}")
        x = embedding(tokens) * math.sqrt(self.d_model) + self.pos_table[start:end]  # (B, T, D)
        return self.dropout(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`src` (B, S) token ids -> encoder output (B, S, D) and its key mask (B, 1, 1, S), False on padding."""
        mask = (src != self.pad_id)[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(src, self.src_embed)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def start_decoding(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> DecoderState:
        """Project the encoder output to every decoder layer's cross-attention keys/values once, for all steps."""
        memory_kv = [layer.cross_attn.keys_values(memory) for layer in self.decoder_layers]
        return DecoderState(memory_kv, memory_mask, [None] * len(self.decoder_layers))

    def decode_step(self, tgt: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Feed the next target tokens `tgt` (B, T) (usually T = 1) after those in `state`; return their logits
        (B, T, V). `state` is updated in place, so the next call continues after them."""
        y = self._embed(tgt, self.tgt_embed, start=state.length)  # (B, T, D)
        for i, layer in enumerate(self.decoder_layers):
            y, state.self_kv[i] = layer(y, state.memory_kv[i], state.memory_mask, past=state.self_kv[i])
        state.length += tgt.shape[1]
        return F.linear(self.decoder_norm(y), self.tgt_embed.weight)  # (B, T, V): the tied output projection

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: `src` (B, S), `tgt_in` (B, T) = BOS + target without its last token -> logits (B, T, V).

        Target padding needs no mask: padding sits after the real tokens, which the causal mask already hides it from.
        """
        return self.decode_step(tgt_in, self.start_decoding(*self.encode(src)))


# Named sizes: (d_model, num_heads, layers per stack, d_ff, dropout). base and big are Table 3's; big's dropout is
# the EN-DE value (EN-FR used 0.1). small and tiny are for CPUs: Multi30k and the synthetic tests.
TRANSFORMER_ARCHS = {
    "transformer_tiny": (64, 4, 2, 256, 0.0),
    "transformer_small": (256, 4, 3, 1024, 0.1),
    "transformer_base": (512, 8, 6, 2048, 0.1),
    "transformer_big": (1024, 16, 6, 4096, 0.3),
}


def _build(arch: str, src_vocab_size: int, tgt_vocab_size: int | None, **kwargs) -> Transformer:
    d_model, num_heads, layers, d_ff, dropout = TRANSFORMER_ARCHS[arch]
    kwargs.setdefault("dropout", dropout)
    return Transformer(src_vocab_size, tgt_vocab_size, d_model=d_model, num_heads=num_heads, num_encoder_layers=layers,
                       num_decoder_layers=layers, d_ff=d_ff, **kwargs)


def transformer_tiny(*, src_vocab_size: int, tgt_vocab_size: int | None = None, **kwargs) -> Transformer:
    """d_model 64, 4 heads, 2 + 2 layers, d_ff 256, no dropout: synthetic tasks in seconds on a CPU."""
    return _build("transformer_tiny", src_vocab_size, tgt_vocab_size, **kwargs)


def transformer_small(*, src_vocab_size: int, tgt_vocab_size: int | None = None, **kwargs) -> Transformer:
    """d_model 256, 4 heads, 3 + 3 layers, d_ff 1024: small corpora (Multi30k) on a CPU."""
    return _build("transformer_small", src_vocab_size, tgt_vocab_size, **kwargs)


def transformer_base(*, src_vocab_size: int = 37000, tgt_vocab_size: int | None = None, **kwargs) -> Transformer:
    """The paper's base model: N=6, d_model 512, d_ff 2048, h=8, P_drop 0.1 (63.1M parameters at a 37k shared vocab)."""
    return _build("transformer_base", src_vocab_size, tgt_vocab_size, **kwargs)


def transformer_big(*, src_vocab_size: int = 37000, tgt_vocab_size: int | None = None, **kwargs) -> Transformer:
    """The paper's big model: N=6, d_model 1024, d_ff 4096, h=16, P_drop 0.3 (EN-DE)."""
    return _build("transformer_big", src_vocab_size, tgt_vocab_size, **kwargs)
