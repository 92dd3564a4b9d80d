"""Sequence-to-sequence translation: the training objective and decoding of "Attention Is All You Need" (sec. 5-6).

Training minimises label-smoothed cross-entropy (eps_ls = 0.1) over the non-padding target tokens with teacher
forcing. Adam(0.9, 0.98, eps 1e-9) follows `InverseSqrtWarmupLR`, stepped every optimizer step. Validation and test
translate every source sentence (greedy while training, beam search with beam 4 and length penalty 0.6 at test time,
both through the decoder's key/value cache), score the corpus with SacreBLEU (`val/bleu`, `test/bleu`, 0-100) and log a
few samples as a table (W&B `log_text`, TensorBoard text, or a markdown file in the log folder for other loggers).

The data contract: the DataModule (`lit_papers.data.translation`) yields `{"src", "tgt", "src_text", "tgt_text"}`
batches and exposes `vocab_size`, `pad_id`, `bos_id`, `eos_id` and `decode(ids) -> texts`. The net's vocabulary sizes
and special ids are set in its own config; `setup` checks that they agree with the DataModule's and names any value
that differs, so a mismatch fails before the first step instead of as an index error.

Deviations from the paper:
- BLEU is SacreBLEU on detokenized text (13a tokenization), not the paper's tokenized multi-bleu; the paper also
  averaged the last 5 (base) or 20 (big) checkpoints before testing, which is not done here.
- Beam search stops a sentence by Hugging Face's rule (see `beam_search`; the paper says only "terminate early when
  possible"). Lengths in the penalty ((5 + |Y|) / 6)^alpha count the end-of-sentence token.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchmetrics.text import SacreBLEUScore

from lit_papers.nets.transformer import DecoderState, Transformer
from lit_papers.optim import build_lr_scheduler, build_optimizer
from lit_papers.tasks.base import NonFiniteLoss, Task, save_task_hyperparameters


class InverseSqrtWarmupLR(LambdaLR):
    """The paper's schedule (sec. 5.3): linear warm-up, then decay with the inverse square root of the step.

    `lr(step) = peak x min(step / warmup_steps, sqrt(warmup_steps / step))`, steps counted from 1, where `peak` is
    the optimizer's lr. With `peak = (d_model x warmup_steps)^-0.5` this is the paper's
    `d_model^-0.5 x min(step^-0.5, step x warmup_steps^-1.5)`: 6.99e-4 for the base model (d_model 512, 4000 steps).
    Step it every optimizer step.

    Args:
        optimizer: the wrapped optimizer; its lr is the peak, reached at `warmup_steps`.
        warmup_steps: length of the linear warm-up.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 4000, last_epoch: int = -1) -> None:
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        step += 1  # LambdaLR's step 0 sets the lr of the first optimizer step
        return min(step / self.warmup_steps, (self.warmup_steps / step) ** 0.5)


# ---------------------------------------------------------------- decoding


def _next_log_probs(net: Transformer, last: torch.Tensor, state: DecoderState, step: int,
                    max_lens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token (N, V): never padding or BOS, only EOS once a row reaches its max length."""
    log_probs = net.decode_step(last, state)[:, -1].float().log_softmax(-1)  # (N, V)
    log_probs[:, [net.pad_id, net.bos_id]] = -torch.inf
    not_eos = torch.arange(log_probs.shape[1], device=log_probs.device) != net.eos_id  # (V,)
    return log_probs.masked_fill((step >= max_lens)[:, None] & not_eos, -torch.inf)


def _max_lens(net: Transformer, src: torch.Tensor, max_len_offset: int) -> torch.Tensor:
    return (src != net.pad_id).sum(1) + max_len_offset  # (B,): the paper's "input length + 50"


@torch.no_grad()
def greedy_search(net: Transformer, src: torch.Tensor, max_len_offset: int = 50) -> list[list[int]]:
    """Most likely token at every step; `src` (B, S) -> B token lists without BOS/EOS."""
    state = net.start_decoding(*net.encode(src))
    max_lens = _max_lens(net, src, max_len_offset)
    tokens = src.new_full((src.shape[0], 1), net.bos_id)  # (B, 1)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for step in range(int(max_lens.max()) + 1):
        next_token = _next_log_probs(net, tokens[:, -1:], state, step, max_lens).argmax(-1)  # (B,)
        tokens = torch.cat([tokens, next_token.masked_fill(done, net.pad_id)[:, None]], dim=1)
        done |= next_token == net.eos_id
        if done.all():
            break
    return [[t for t in row if t not in (net.eos_id, net.pad_id)] for row in tokens[:, 1:].tolist()]


@torch.no_grad()
def beam_search(net: Transformer, src: torch.Tensor, beam_size: int = 4, length_penalty: float = 0.6,
                max_len_offset: int = 50) -> list[list[int]]:
    """Beam search with GNMT's length normalisation `log p(Y) / ((5 + |Y|) / 6)^length_penalty`.

    Each step ranks 2K continuations of the K live hypotheses; those ending in EOS within the top K are finished
    (the best K are kept), the best K others live on. A sentence is done once it has K finished hypotheses and its
    best live one, normalised at its current length, scores no better than the worst of them (Hugging Face's rule;
    a strict bound would decode every sentence to the length limit). The best finished one is returned. With K = 1
    this is exactly `greedy_search`.
    """
    b, k = src.shape[0], beam_size
    memory, memory_mask = net.encode(src)
    state = net.start_decoding(memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0))  # row = i*K + j
    max_lens = _max_lens(net, src, max_len_offset).repeat_interleave(k)  # (B*K,)
    tokens = src.new_full((b * k, 1), net.bos_id)
    scores = torch.full((b, k), -torch.inf, device=src.device)
    scores[:, 0] = 0.0  # the K beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]  # (normalised score, tokens), best first
    done = [False] * b
    for step in range(int(max_lens.max()) + 1):
        log_probs = _next_log_probs(net, tokens[:, -1:], state, step, max_lens)  # (B*K, V)
        vocab = log_probs.shape[1]
        candidates = (scores.view(-1, 1) + log_probs).view(b, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=1)  # (B, 2K), best first
        parent, token = top_index // vocab, top_index % vocab  # beam and token of each candidate
        is_eos = token == net.eos_id
        penalty = ((5 + step + 1) / 6) ** length_penalty  # |Y| = step + 1 tokens, EOS included
        for i, j in (is_eos[:, :k] & top_scores[:, :k].isfinite()).nonzero().tolist():
            if not done[i]:
                hypothesis = tokens[i * k + parent[i, j], 1:].tolist()
                finished[i] = sorted(finished[i] + [(top_scores[i, j].item() / penalty, hypothesis)], reverse=True)[:k]
        keep = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :k]  # the best K that go on: (B, K)
        scores = top_scores.gather(1, keep)
        best_alive = (scores[:, 0] / penalty).tolist()
        done = [d or (len(f) == k and a <= f[-1][0]) for d, f, a in zip(done, finished, best_alive)]
        if all(done):
            break
        rows = (torch.arange(b, device=src.device)[:, None] * k + parent.gather(1, keep)).view(-1)  # (B*K,)
        tokens = torch.cat([tokens[rows], token.gather(1, keep).view(-1, 1)], dim=1)
        state.reorder(rows)
    return [f[0][1] if f else [] for f in finished]


# ---------------------------------------------------------------- sample tables


def log_text_table(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[str]]) -> Path | None:
    """Log a small text table to every logger (rank 0): W&B table, TensorBoard markdown, else a markdown file under
    `<log_dir>/samples/` (returned)."""
    if not trainer.is_global_zero:
        return None
    cells = [[c.replace("|", "\\|") for c in row] for row in [columns, ["---"] * len(columns), *rows]]
    markdown = "\n".join("| " + " | ".join(row) + " |" for row in cells)
    written = None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_text(key=key, columns=columns, data=rows, step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown, trainer.global_step)
        else:
            folder = Path(logger.log_dir or trainer.default_root_dir)
            written = _write_markdown(folder, key, trainer.global_step, markdown)
    if not trainer.loggers:
        written = _write_markdown(Path(trainer.default_root_dir), key, trainer.global_step, markdown)
    return written


def _write_markdown(root: Path, key: str, step: int, markdown: str) -> Path:
    path = root / "samples" / f"{key.replace('/', '_')}_step{step:07d}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- the task


class Translation(Task):
    """Train an encoder-decoder on sentence pairs; logs `train/loss`, `val/loss`, `val/ppl`, `val/bleu`,
    `val/exact_match` (share of sentences translated exactly as the reference), the same under `test/`, and samples.

    Args:
        net: the encoder-decoder (`lit_papers.nets.transformer.Transformer`).
        optimizer: builds the optimizer from the parameters; `None` is the paper's Adam(betas=(0.9, 0.98), eps=1e-9)
            at lr 6.99e-4, the base model's peak.
        lr_scheduler: stepped every optimizer step, e.g. `InverseSqrtWarmupLR`; `None` keeps the lr constant.
        label_smoothing: eps_ls of the loss (0.1).
        beam_size: beam width at test and predict time (4); 1 is greedy decoding.
        length_penalty: alpha of the length normalisation (0.6).
        max_len_offset: translations stop at source length + this many tokens (50).
        val_beam_size: beam width during validation: 1 (greedy) keeps the per-epoch BLEU cheap.
        num_samples: translations of a validation/test batch to log as a table each epoch (0: none).
        nonfinite_loss: what a NaN or infinite training loss does: "stop" with an error naming the step, or "skip"
            the optimizer step (see `lit_papers.tasks.base.Task`).
    """

    def __init__(
        self,
        net: Transformer,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.1,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_len_offset: int = 50,
        val_beam_size: int = 1,
        num_samples: int = 8,
        nonfinite_loss: NonFiniteLoss = "stop",
    ) -> None:
        super().__init__(nonfinite_loss)
        save_task_hyperparameters(self, live_objects=["net", "optimizer", "lr_scheduler"])
        self.net = net
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=(512 * 4000) ** -0.5,
                                                                betas=(0.9, 0.98), eps=1e-9)
        self.scheduler_factory = lr_scheduler
        self.label_smoothing, self.max_len_offset, self.num_samples = label_smoothing, max_len_offset, num_samples
        self.beam_size, self.length_penalty, self.val_beam_size = beam_size, length_penalty, val_beam_size
        # Per-token means (loss, nll) as torchmetrics means weighted by tokens: summed over DDP ranks exactly, where
        # `self.log(..., sync_dist=True)` averages the ranks' means, wrong for unequal token counts (Lightning #21838).
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({"bleu": SacreBLEUScore(), "exact_match": MeanMetric(), "loss": MeanMetric(),
                                  "nll": MeanMetric()})
            for stage in ("val", "test")
        })
        self._samples: list[list[str]] = []

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self.trainer is not None else None
        if data is None:
            return
        net = self.net
        mismatched = [f"{name}: net {getattr(net, name)}, data {getattr(data, name)}"
                      for name in ("pad_id", "bos_id", "eos_id") if getattr(net, name) != getattr(data, name)]
        if data.vocab_size > min(net.src_vocab_size, net.tgt_vocab_size):
            mismatched.append(f"vocab_size: data {data.vocab_size} exceeds the net's src_vocab_size "
                              f"{net.src_vocab_size} / tgt_vocab_size {net.tgt_vocab_size}")
        if mismatched:
            raise ValueError("the net and the DataModule disagree on the vocabulary; set the same values in both "
                             "configs:\n  " + "\n  ".join(mismatched))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.net(src, tgt_in)  # (B, T, V)

    def generate(self, src: torch.Tensor, beam_size: int | None = None) -> list[list[int]]:
        """Translate `src` (B, S) into B lists of target token ids (no BOS/EOS); `beam_size` defaults to the task's."""
        beam_size = self.beam_size if beam_size is None else beam_size
        if beam_size == 1:
            return greedy_search(self.net, src, self.max_len_offset)
        return beam_search(self.net, src, beam_size, self.length_penalty, self.max_len_offset)

    def _decode(self, ids: list[list[int]]) -> list[str]:
        data = self.trainer.datamodule
        if not hasattr(data, "decode"):
            raise RuntimeError("translating needs a DataModule with `decode` (see `lit_papers.data.translation`)")
        return data.decode(ids)

    def _losses(self, batch: dict, with_nll: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Label-smoothed loss and (for perplexity) plain NLL per non-padding target token, and their count."""
        tgt_out = batch["tgt"][:, 1:]  # (B, T-1): predict each next token
        logits = self.net(batch["src"], batch["tgt"][:, :-1]).flatten(0, 1)  # (B*(T-1), V)
        pad, target = self.net.pad_id, tgt_out.flatten()
        loss = F.cross_entropy(logits, target, ignore_index=pad, label_smoothing=self.label_smoothing)
        nll = F.cross_entropy(logits, target, ignore_index=pad) if with_nll else None
        return loss, nll, (tgt_out != pad).sum()  # a tensor: reading the count on the host would wait for the device

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, num_tokens = self._losses(batch)
        self.log_train_step("train/loss", loss, prog_bar=True, weight=num_tokens)  # mean per token over the window
        return loss

    def _evaluate(self, batch: dict, batch_idx: int, stage: str, beam_size: int) -> None:
        loss, nll, num_tokens = self._losses(batch, with_nll=True)
        metrics = self.metrics[stage]
        metrics["loss"].update(loss, num_tokens)
        metrics["nll"].update(nll, num_tokens)
        hypotheses = self._decode(self.generate(batch["src"], beam_size))
        metrics["bleu"].update(hypotheses, [[ref] for ref in batch["tgt_text"]])
        metrics["exact_match"].update(torch.tensor([h == r for h, r in zip(hypotheses, batch["tgt_text"])]).float())
        num_batches = (self.trainer.num_val_batches if stage == "val" else self.trainer.num_test_batches)[0]
        if batch_idx == int(min(num_batches, 1e9)) // 2:  # batches are sorted by length: show mid-length sentences
            rows = zip(batch["src_text"], batch["tgt_text"], hypotheses)
            self._samples = [list(row) for row in rows][: self.num_samples]

    def _log_epoch(self, stage: str) -> None:
        metrics = self.metrics[stage]
        self.log(f"{stage}/loss", metrics["loss"].compute(), prog_bar=stage == "val")
        self.log(f"{stage}/bleu", metrics["bleu"].compute() * 100, prog_bar=stage == "val")  # 0-100, as in papers
        self.log(f"{stage}/ppl", metrics["nll"].compute().exp())
        self.log(f"{stage}/exact_match", metrics["exact_match"].compute())
        for metric in metrics.values():
            metric.reset()
        if self._samples and not self.trainer.sanity_checking:
            log_text_table(self.trainer, f"{stage}/samples", ["source", "reference", "hypothesis"], self._samples)
        self._samples = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val", self.val_beam_size)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test", self.beam_size)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        return self._decode(self.generate(batch["src"]))

    def configure_optimizers(self):
        optimizer = build_optimizer(self, self.net, self.optimizer_factory)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = build_lr_scheduler(self.scheduler_factory, optimizer, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
