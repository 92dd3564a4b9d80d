"""Parallel text for sequence-to-sequence tasks: files on disk (WMT14, Multi30k) and a synthetic reversal task.

Both DataModules yield the same batches and expose the same vocabulary contract, which the `Translation` task reads:

    batch = {"src": (B, S) ids + EOS, "tgt": (B, T) BOS + ids + EOS, "src_text": [...], "tgt_text": [...]}
    dm.vocab_size, dm.pad_id, dm.bos_id, dm.eos_id, dm.decode(list_of_id_lists) -> list[str]

Sequences are right-padded with `pad_id`. Batches hold a number of *tokens*, not sentences (the paper's ~25k source
+ 25k target tokens per step): `TokenBatchSampler` groups sentences of similar length, so padding stays low.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
)

from lit_papers.callbacks.images import local_log_dir
from lit_papers.data.base import LoaderDataModule

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the defaults of `lit_papers.nets.transformer.Transformer`
PAD_ID, BOS_ID, EOS_ID = range(3)


def read_lines(path: Path) -> list[str]:
    """One sentence per line, from a plain or gzipped UTF-8 file (line ends removed, nothing else)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def find_split(root: Path, prefix: str, lang: str) -> Path:
    """`root/{prefix}.{lang}` or `root/{prefix}.{lang}.gz`, with an error naming both when neither exists."""
    if not root.is_dir():
        raise FileNotFoundError(f"parallel text folder {root} does not exist (expected files like {prefix}.{lang}.gz)")
    candidates = [root / f"{prefix}.{lang}", root / f"{prefix}.{lang}.gz"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {candidates[0].name} or {candidates[1].name} in {root}")


def read_parallel(root: Path, prefix: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """The aligned source and target sentences of one split; misaligned files are an error, never truncated."""
    src_path, tgt_path = find_split(root, prefix, src_lang), find_split(root, prefix, tgt_lang)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(f"misaligned parallel files: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    return src, tgt


def train_bpe(sentences: list[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) learned on `sentences`, with `SPECIAL_TOKENS` as ids 0, 1, 2.

    Byte-level: every string encodes without unknown tokens and decodes back to itself exactly, so the BLEU
    hypotheses are real detokenized text. Training is deterministic, so every DDP rank learns the same vocabulary.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever out of vocabulary
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer, length=len(sentences))
    return tokenizer


class PairDataset(Dataset):
    """Tokenized sentence pairs in flat int32 arrays (millions of WMT pairs as Python lists would not fit in memory).

    Item `i` is `(src ids + EOS, BOS + tgt ids + EOS, src text, tgt text)`; texts are `None` when not kept.
    """

    def __init__(self, src: list[list[int]], tgt: list[list[int]], src_text: list[str] | None = None,
                 tgt_text: list[str] | None = None) -> None:
        self.src_ids, self.src_offsets = self._flatten(src)
        self.tgt_ids, self.tgt_offsets = self._flatten(tgt)
        self.src_text, self.tgt_text = src_text, tgt_text
        self.src_lengths = np.diff(self.src_offsets) + 1  # + EOS
        self.tgt_lengths = np.diff(self.tgt_offsets) + 2  # + BOS, EOS

    @staticmethod
    def _flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return flat, offsets

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str | None, str | None]:
        src = torch.from_numpy(self.src_ids[self.src_offsets[i]:self.src_offsets[i + 1]]).long()
        tgt = torch.from_numpy(self.tgt_ids[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]).long()
        src = torch.cat([src, torch.tensor([EOS_ID])])
        tgt = torch.cat([torch.tensor([BOS_ID]), tgt, torch.tensor([EOS_ID])])
        texts = (self.src_text[i], self.tgt_text[i]) if self.src_text is not None else (None, None)
        return src, tgt, *texts


def collate_pairs(items: list[tuple[torch.Tensor, torch.Tensor, str | None, str | None]]) -> dict:
    src, tgt, src_text, tgt_text = zip(*items)
    batch = {
        "src": pad_sequence(src, batch_first=True, padding_value=PAD_ID),  # (B, S)
        "tgt": pad_sequence(tgt, batch_first=True, padding_value=PAD_ID),  # (B, T)
    }
    if src_text[0] is not None:
        batch |= {"src_text": list(src_text), "tgt_text": list(tgt_text)}
    return batch


class TokenBatchSampler(BatchSampler):
    """Batches of sentence indices holding at most `max_tokens` tokens, padding included, on each side.

    The sentences are shuffled (seeded), split into pools of `pool_size`, sorted by length within each pool and cut
    into batches once, so the number of batches is fixed; each epoch shuffles the order of the batches. One pool for
    the whole split (`pool_size=None`) gives the least padding (fairseq's scheme); small pools mix lengths across
    batches, which some tasks need (batches of a single length bias the gradient when the mapping depends on length).

    Only the rank, world size and epoch of `sampler` are used (Lightning sets the epoch, and under DDP swaps in its
    own `DistributedSampler`, keeping the other arguments). Each rank takes every `world_size`-th batch, the batches
    split as Lightning's samplers split samples: training pads the list by repeating batches, as `DistributedSampler`
    does, so all ranks step equally often; with `unrepeated` the shards are disjoint and one rank may get one batch
    fewer, as `UnrepeatedDistributedSampler` does, so evaluation scores every sentence once.

    Args:
        sampler: where the epoch (and, under DDP, rank and world size) come from.
        src_lengths: source length of each item, in tokens.
        tgt_lengths: target length of each item, in tokens.
        max_tokens: the most padded tokens per batch on either side (a longer sentence gets a batch of its own).
        shuffle: shuffle the batch order every epoch.
        pool_size: sentences sorted by length together; `None`: the whole split.
        seed: seeds the tie-breaking and the shuffles (same on all ranks).
        drop_last: unused (lengths decide batch sizes); kept so Lightning can re-create the sampler.
        unrepeated: disjoint shards of the batches across ranks, none repeated (evaluation).
    """

    def __init__(self, sampler: Sampler, src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int,
                 shuffle: bool = True, pool_size: int | None = None, seed: int = 0, drop_last: bool = False,
                 unrepeated: bool = False) -> None:
        self.sampler, self.shuffle, self.seed, self.drop_last = sampler, shuffle, seed, drop_last
        order = np.random.default_rng(seed).permutation(len(src_lengths))  # random order among equal lengths
        pool_size = pool_size or max(len(order), 1)
        self.batches: list[list[int]] = []
        for start in range(0, len(order), pool_size):
            pool = order[start:start + pool_size]
            pool = pool[np.lexsort((src_lengths[pool], tgt_lengths[pool]))]  # stable: by target, then source length
            self._cut(pool.tolist(), src_lengths, tgt_lengths, max_tokens)
        # This rank's positions in the (shuffled) list of batches.
        split = UnrepeatedDistributedSampler if unrepeated else DistributedSampler
        self.shard = split(self.batches, num_replicas=getattr(sampler, "num_replicas", 1),
                           rank=getattr(sampler, "rank", 0), shuffle=False)

    def _cut(self, pool: list[int], src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int) -> None:
        batch, longest = [], 0
        for i in pool:
            length = max(int(src_lengths[i]), int(tgt_lengths[i]))
            if batch and (len(batch) + 1) * max(longest, length) > max_tokens:
                self.batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, length)
        if batch:
            self.batches.append(batch)

    def __len__(self) -> int:
        return len(self.shard)

    def __iter__(self):
        order = np.arange(len(self.batches))
        if self.shuffle:
            order = np.random.default_rng([self.seed, getattr(self.sampler, "epoch", 0)]).permutation(order)
        for position in self.shard:
            yield self.batches[order[position]]


class Seq2SeqDataModule(LoaderDataModule):
    """Base class: subclasses set `vocab_size` and the `train_set`, `val_set`, `test_set` `PairDataset`s, and
    implement `decode`. Loaders batch by tokens (`TokenBatchSampler`); the rest (workers, pinning, seeds, checkpointed
    streams) is `LoaderDataModule`'s.

    The training batches' order is drawn from the seed and the epoch, as Lightning's `DistributedSampler` draws its
    shuffle, so a run resumed at an epoch boundary sees the batches of an uninterrupted one without saved state.

    Args:
        max_tokens: padded tokens per batch and side on each device (the paper: ~25000 per step over all devices).
        pool_size: training sentences sorted by length together before batching (see `TokenBatchSampler`); `None`
            sorts the whole split. Evaluation always sorts the whole split.
        num_workers: loader worker processes.
        seed: seeds the batch order, together with `seed_everything`'s seed (`lit_papers.data.base.stream_seed`).
    """

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    vocab_size: int
    train_set: PairDataset | None
    val_set: PairDataset | None
    test_set: PairDataset | None

    def __init__(self, max_tokens: int = 25000, pool_size: int | None = None, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__(num_workers=num_workers, seed=seed)
        self.max_tokens, self.pool_size = max_tokens, pool_size

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Token ids (special tokens allowed, they are dropped) -> text."""
        raise NotImplementedError

    def _batching(self, dataset: PairDataset, train: bool, rank: int, world: int) -> dict[str, Any]:
        # The sampler only carries the rank, world size and epoch (see `TokenBatchSampler`).
        epochs = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        batches = TokenBatchSampler(epochs, dataset.src_lengths, dataset.tgt_lengths, self.max_tokens, shuffle=train,
                                    pool_size=self.pool_size if train else None, seed=self.stream_seed,
                                    unrepeated=not train)
        return {"batch_sampler": batches, "collate_fn": collate_pairs}


class ParallelTextDataModule(Seq2SeqDataModule):
    """Sentence-aligned files `{root}/{prefix}.{lang}[.gz]` with a joint BPE vocabulary learned on the training split.

    Layouts: Multi30k (`train`, `val`, `test_2016_flickr`) and WMT14 as prepared by most toolkits (`train`,
    `newstest2013`, `newstest2014`). The tokenizer is learned on the training split's source and target sentences
    together (one shared vocabulary, as the paper's EN-DE setup), unless `tokenizer_path` names one. It is stored in
    every checkpoint (so `fit --ckpt_path` and `test --ckpt_path` reuse it) and written to `tokenizer.json` in the log
    folder when training starts.

    Args:
        root: the folder holding the files.
        src_lang: source language suffix, e.g. "de".
        tgt_lang: target language suffix, e.g. "en".
        train_prefix: file name before the language of the training split.
        val_prefix: same, validation split.
        test_prefix: same, test split (`None`: test on the validation split).
        vocab_size: BPE vocabulary size, special tokens included (the paper: 37000 for EN-DE).
        min_frequency: merges seen fewer times than this are not learned.
        max_train_len: training pairs with more tokens than this on either side are dropped (evaluation keeps all).
        tokenizer_path: a saved `tokenizer.json` to use instead of learning one.
        max_tokens, pool_size, num_workers, seed: see `Seq2SeqDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        src_lang: str,
        tgt_lang: str,
        train_prefix: str = "train",
        val_prefix: str = "val",
        test_prefix: str | None = "test",
        vocab_size: int = 37000,
        min_frequency: int = 2,
        max_train_len: int = 256,
        tokenizer_path: str | Path | None = None,
        max_tokens: int = 25000,
        pool_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(max_tokens, pool_size, num_workers, seed)
        self.root, self.src_lang, self.tgt_lang = Path(root), src_lang, tgt_lang
        self.prefixes = {"train": train_prefix, "val": val_prefix, "test": test_prefix}
        self.vocab_size, self.min_frequency, self.max_train_len = vocab_size, min_frequency, max_train_len
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self._tokenizer: Tokenizer | None = None
        self._text: dict[str, tuple[list[str], list[str]]] = {}

    def _split_text(self, split: str) -> tuple[list[str], list[str]]:
        if split not in self._text:
            self._text[split] = read_parallel(self.root, self.prefixes[split], self.src_lang, self.tgt_lang)
        return self._text[split]

    @property
    def tokenizer(self) -> Tokenizer:
        """Loaded from `tokenizer_path` or a checkpoint, else learned on the training split at first use."""
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
            else:
                src, tgt = self._split_text("train")
                rank_zero_info(f"learning a {self.vocab_size}-token BPE vocabulary on {len(src)} training pairs")
                self._tokenizer = train_bpe(src + tgt, self.vocab_size, self.min_frequency)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        # Only read and check the text here: the tokenizer may still come from the checkpoint Lightning restores
        # after `setup`, so sentences are tokenized when the loaders are built.
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in needed.get(stage, ["train", "val", "test"]):
            self._split_text(split if self.prefixes[split] is not None else "val")

    def _dataset(self, split: str, keep_text: bool) -> PairDataset:
        src_text, tgt_text = self._split_text(split)
        src = [e.ids for e in self.tokenizer.encode_batch(src_text)]
        tgt = [e.ids for e in self.tokenizer.encode_batch(tgt_text)]
        if split == "train":
            limit = self.max_train_len - 2  # BOS and EOS
            keep = [i for i in range(len(src)) if len(src[i]) <= limit and len(tgt[i]) <= limit]
            if not keep:
                raise ValueError(f"all {len(src)} training pairs are longer than max_train_len={self.max_train_len}")
            if len(keep) < len(src):
                dropped = len(src) - len(keep)
                rank_zero_info(f"dropped {dropped} training pairs longer than max_train_len={self.max_train_len}")
                src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
        texts = (src_text, tgt_text) if keep_text else (None, None)
        return PairDataset(src, tgt, *texts)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.train_set = self._dataset("train", keep_text=False)
            self._save_tokenizer()
        return super().train_dataloader()

    def val_dataloader(self) -> DataLoader:
        self.val_set = self.val_set or self._dataset("val", keep_text=True)
        return super().val_dataloader()

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.test_set = self._dataset("test" if self.prefixes["test"] is not None else "val", keep_text=True)
        return super().test_dataloader()

    def _save_tokenizer(self) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            folder = local_log_dir(trainer)  # `trainer.log_dir` broadcasts: rank 0 alone would hang under DDP
            folder.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(str(folder / "tokenizer.json"))

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.decode_batch(ids, skip_special_tokens=True)

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints carry the vocabulary their weights were trained on.
        return super().state_dict() | {"tokenizer": self.tokenizer.to_str()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._tokenizer = Tokenizer.from_str(state_dict["tokenizer"])
        self.train_set = self.val_set = self.test_set = None  # re-tokenize with the restored vocabulary


class ReverseDataModule(Seq2SeqDataModule):
    """Synthetic task: translate a random sequence of symbols into the same sequence reversed.

    A correct encoder-decoder (attention, masks, positions, decoding) solves it exactly; a missing causal mask or
    broken positions cannot. Symbols are written as "s0 s1 ..." in the texts that BLEU and the samples show.

    Args:
        num_symbols: distinct symbols (token ids 3 .. 3 + num_symbols - 1).
        min_len: shortest sequence.
        max_len: longest sequence.
        num_train: training pairs, drawn once.
        num_val: validation pairs (also the test set), drawn once.
        split_seed: fixes the drawn data, independently of the training seed.
        max_tokens, pool_size, num_workers, seed: see `Seq2SeqDataModule`.
    """

    def __init__(self, num_symbols: int = 10, min_len: int = 1, max_len: int = 8, num_train: int = 20000,
                 num_val: int = 500, split_seed: int = 0, max_tokens: int = 1024, pool_size: int | None = 128,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(max_tokens, pool_size, num_workers, seed)
        self.num_symbols, self.min_len, self.max_len = num_symbols, min_len, max_len
        self.num_train, self.num_val, self.split_seed = num_train, num_val, split_seed
        self.vocab_size = len(SPECIAL_TOKENS) + num_symbols

    def _draw(self, n: int, rng: np.random.Generator) -> PairDataset:
        lengths = rng.integers(self.min_len, self.max_len + 1, size=n)
        src = [rng.integers(len(SPECIAL_TOKENS), self.vocab_size, size=k).tolist() for k in lengths]
        tgt = [s[::-1] for s in src]
        return PairDataset(src, tgt, self.decode(src), self.decode(tgt))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            rng = np.random.default_rng(self.split_seed)
            self.train_set, self.val_set = self._draw(self.num_train, rng), self._draw(self.num_val, rng)

    def decode(self, ids: list[list[int]]) -> list[str]:
        offset = len(SPECIAL_TOKENS)
        return [" ".join(f"s{t - offset}" for t in seq if t >= offset) for seq in ids]
