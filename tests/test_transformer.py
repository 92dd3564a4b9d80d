"""The Transformer (Vaswani et al. 2017): masks, parity with torch.nn.Transformer, the KV cache, decoding, the
learning-rate schedule, the parallel-text pipeline, and the synthetic reversal task through the CLI."""

from __future__ import annotations

import gzip
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from tokenizers import Tokenizer
from torch import nn

from lit_papers.cli import main
from lit_papers.data import translation as data
from lit_papers.data.translation import (
    ParallelTextDataModule,
    TokenBatchSampler,
    read_parallel,
    train_bpe,
)
from lit_papers.nets.transformer import (
    DecoderState,
    Transformer,
    transformer_base,
    transformer_big,
    transformer_tiny,
)
from lit_papers.tasks.translation import (
    InverseSqrtWarmupLR,
    Translation,
    beam_search,
    greedy_search,
    log_text_table,
)

REVERSE = str(REPO_ROOT / "configs" / "transformer" / "reverse_tiny.yaml")
MULTI30K = REPO_ROOT.parent / "shared" / "data" / "multi30k"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SENTENCES = [
    ("Ein Mann fährt Fahrrad.", "A man rides a bike."),
    ("Zwei Hunde spielen im Schnee.", "Two dogs play in the snow."),
    ("Eine Frau liest ein Buch.", "A woman reads a book."),
    ("Kinder spielen Fußball im Park.", "Children play soccer in the park."),
] * 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and much faster than two on a shared CPU (threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(vocab: int = 13, norm_first: bool = False) -> Transformer:
    torch.manual_seed(0)
    return transformer_tiny(src_vocab_size=vocab, norm_first=norm_first).eval()


# ---------------------------------------------------------------- architecture


def test_padding_changes_nothing():
    net = tiny_net()
    src, tgt = torch.randint(3, 13, (2, 6)), torch.randint(3, 13, (2, 5))
    padded_src = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], dim=1)  # 4 padding positions (pad_id 0)
    memory, _ = net.encode(src)
    padded_memory, mask = net.encode(padded_src)
    assert mask[:, 0, 0].tolist() == [[True] * 6 + [False] * 4] * 2
    torch.testing.assert_close(padded_memory[:, :6], memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(padded_src, tgt), net(src, tgt), atol=1e-5, rtol=1e-5)


def test_decoder_never_sees_future_tokens_and_encoder_sees_all():
    net = tiny_net()
    src, tgt = torch.randint(3, 13, (2, 6)), torch.randint(3, 13, (2, 7))
    logits = net(src, tgt)
    for j in range(1, 7):
        changed = tgt.clone()
        changed[:, j:] = torch.randint(3, 13, (2, 7 - j))
        torch.testing.assert_close(net(src, changed)[:, :j], logits[:, :j])  # positions before j unchanged
    changed_src = src.clone()
    changed_src[:, -1] = (src[:, -1] - 2) % 10 + 3  # a different last source token
    assert not torch.allclose(net.encode(changed_src)[0][:, 0], net.encode(src)[0][:, 0])  # bidirectional encoder


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_matches_torch_nn_transformer(norm_first):
    net = tiny_net(norm_first=norm_first)
    d = net.d_model
    ref = nn.Transformer(d, 4, 2, 2, 256, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    with torch.no_grad():
        pairs = [*zip(net.encoder_layers, ref.encoder.layers), *zip(net.decoder_layers, ref.decoder.layers)]
        for mine, theirs in pairs:
            attns = [(mine.self_attn, theirs.self_attn)]
            if hasattr(mine, "cross_attn"):
                attns.append((mine.cross_attn, theirs.multihead_attn))
            for a, b in attns:
                b.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.kv_proj.weight]))  # rows: W^Q, W^K, W^V
                b.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.kv_proj.bias]))
                b.out_proj.load_state_dict(a.out_proj.state_dict())
            theirs.linear1.load_state_dict(mine.ffn[0].state_dict())
            theirs.linear2.load_state_dict(mine.ffn[2].state_dict())
            for k in (1, 2, 3):
                if hasattr(mine, f"norm{k}"):
                    getattr(theirs, f"norm{k}").load_state_dict(getattr(mine, f"norm{k}").state_dict())
    for ours, theirs in [(net.encoder_norm, ref.encoder), (net.decoder_norm, ref.decoder)]:
        theirs.norm = ours  # nn.Transformer always adds a final LayerNorm; the paper's post-norm stacks have none
    src = torch.randint(3, 13, (3, 7))
    src[0, 4:] = 0  # padding
    tgt = torch.randint(3, 13, (3, 5))
    embed = lambda tokens: net.src_embed(tokens) * math.sqrt(d) + net.pos_table[: tokens.shape[1]]
    pad = src == 0
    out = ref(embed(src), embed(tgt), tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True,
              src_key_padding_mask=pad, memory_key_padding_mask=pad)
    torch.testing.assert_close(net(src, tgt), out @ net.src_embed.weight.T, atol=1e-5, rtol=1e-4)


def test_kv_cache_equals_full_recomputation():
    net = tiny_net(norm_first=True)
    src, tgt = torch.randint(3, 13, (3, 6)), torch.randint(3, 13, (3, 8))
    full = net(src, tgt)
    state = net.start_decoding(*net.encode(src))
    one_by_one = torch.cat([net.decode_step(tgt[:, i : i + 1], state) for i in range(8)], dim=1)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=1e-5)
    state = net.start_decoding(*net.encode(src))
    chunks = torch.cat([net.decode_step(tgt[:, :3], state), net.decode_step(tgt[:, 3:], state)], dim=1)  # masked block
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=1e-5)


def test_embeddings_are_shared_and_param_counts():
    with torch.device("meta"):  # count without allocating
        base, big = transformer_base(), transformer_big()  # 37k shared vocabulary
    assert base.src_embed is base.tgt_embed
    assert sum(p.numel() for p in base.parameters()) == 63_082_496  # the paper's Table 3: 65M
    separate = transformer_tiny(src_vocab_size=20, tgt_vocab_size=30)
    assert separate.src_embed is not separate.tgt_embed
    assert separate(torch.ones(1, 2).long(), torch.ones(1, 3).long()).shape == (1, 3, 30)
    assert abs(sum(p.numel() for p in big.parameters()) - 213e6) < 2e6  # Table 3: 213M


# ---------------------------------------------------------------- schedule and decoding


def test_schedule_is_the_papers_formula():
    d_model, warmup = 512, 4000
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=(d_model * warmup) ** -0.5)
    scheduler = InverseSqrtWarmupLR(optimizer, warmup_steps=warmup)
    paper = lambda step: d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    seen = {}
    for step in range(1, 12001):  # `step` = the optimizer step about to be taken, counted from 1
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for step in (1, 2, 100, 3999, 4000, 4001, 8000, 12000):
        assert seen[step] == pytest.approx(paper(step), rel=1e-12)
    assert max(seen.values()) == pytest.approx(6.987712e-4, rel=1e-6) == seen[4000]


def test_beam_search_with_beam_one_is_greedy():
    net = tiny_net()
    with torch.no_grad():
        net.tgt_embed.weight[2] *= 6  # a larger EOS row in the tied output projection: hypotheses end at varied lengths
    src = torch.randint(3, 13, (16, 6))
    src[::3, 4:] = 0
    greedy = greedy_search(net, src, max_len_offset=10)
    assert any(len(g) < 14 for g in greedy), "some hypotheses should end before the length limit"
    assert beam_search(net, src, beam_size=1, length_penalty=0.6, max_len_offset=10) == greedy


class _ScriptedNet(nn.Module):
    """A stand-in decoder that, at target position t, is sure of `script[t]` (log p ~ 0), gives EOS log p -12 and
    every other token -20, whatever the prefix: the peaked distributions of a well-trained model."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, script: list[int], vocab: int = 8) -> None:
        super().__init__()
        self.script, self.vocab = script + [2], vocab

    def encode(self, src):
        return src.float()[..., None], (src != 0)[:, None, None, :]

    def start_decoding(self, memory, memory_mask):
        return DecoderState([], memory_mask, [])

    def decode_step(self, tgt, state):
        logits = torch.full((tgt.shape[0], 1, self.vocab), -20.0)
        logits[..., 2] = -12.0
        logits[..., self.script[min(state.length, len(self.script) - 1)]] = 0.0
        state.length += 1
        return logits


def test_beam_search_does_not_stop_at_unlikely_early_ends():
    net, src = _ScriptedNet([3, 4, 5, 3, 4, 5, 6]), torch.full((2, 3), 3)
    # Early EOS candidates rank second at every step; ending the search once K of them are collected would return a
    # truncated translation.
    assert beam_search(net, src, beam_size=4, length_penalty=0.6, max_len_offset=10) == [[3, 4, 5, 3, 4, 5, 6]] * 2


def test_wide_beam_finds_the_best_normalised_hypothesis():
    """With a beam wider than the number of hypotheses, beam search is exhaustive: compare with brute force."""
    net = tiny_net(vocab=5)  # symbols 3 and 4, plus <pad>, <s>, </s>
    src = torch.tensor([[3, 2], [4, 2]])  # max output length = 2 source tokens + offset 1 = 3 symbols before EOS
    alpha = 0.6
    best = []
    for row in src:
        scored = []
        for n in range(4):
            for y in itertools.product([3, 4], repeat=n):
                tgt = torch.tensor([[1, *y, 2]])
                log_probs = net(row[None], tgt[:, :-1]).log_softmax(-1)[0]  # (n + 1, V)
                log_probs[:, :2] = -torch.inf  # the searches never emit <pad> or <s>
                if n == 3:
                    log_probs[3, 3:] = -torch.inf  # at the length limit only EOS is allowed
                score = log_probs.gather(1, tgt[0, 1:, None]).sum() / ((5 + n + 1) / 6) ** alpha
                scored.append((score.item(), list(y)))
        best.append(max(scored)[1])
    assert beam_search(net, src, beam_size=16, length_penalty=alpha, max_len_offset=1) == best


def test_sample_table_goes_to_tensorboard_or_a_markdown_file(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    rows = [["Ein Hund | läuft.", "A dog runs.", "A dog is running."]]
    tensorboard = TensorBoardLogger(tmp_path / "tb")
    trainer = SimpleNamespace(is_global_zero=True, global_step=7, default_root_dir=str(tmp_path), loggers=[tensorboard])
    assert log_text_table(trainer, "val/samples", ["source", "reference", "hypothesis"], rows) is None
    tensorboard.experiment.flush()
    assert list(Path(tensorboard.log_dir).glob("events.out.tfevents.*"))
    trainer.loggers = [CSVLogger(tmp_path / "csv")]
    path = log_text_table(trainer, "val/samples", ["source", "reference", "hypothesis"], rows)
    assert path.name == "val_samples_step0000007.md"
    assert path.read_text().splitlines()[2] == "| Ein Hund \\| läuft. | A dog runs. | A dog is running. |"


# ---------------------------------------------------------------- data


def _write(path: Path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, pairs in [("train", SENTENCES), ("val", SENTENCES[:4]), ("test", SENTENCES[:4])]:
        _write(root / f"{prefix}.de.gz", [de for de, _ in pairs])
        _write(root / f"{prefix}.en", [en for _, en in pairs])  # plain and gzipped files mix
    return root


def test_tokenizer_round_trip_and_is_deterministic():
    sentences = [s for pair in SENTENCES for s in pair]
    tokenizer = train_bpe(sentences, vocab_size=300, min_frequency=1)
    assert [tokenizer.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.to_str() == train_bpe(sentences, vocab_size=300, min_frequency=1).to_str()
    for text in ["Ein Mann fährt Fahrrad.", "Unseen: Größe, naïve café — 日本語 ✓", "  two  spaces ", ""]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_misaligned_and_missing_files_are_named(tmp_path):
    _write(tmp_path / "train.de", ["a", "b", "c"])
    _write(tmp_path / "train.en.gz", ["a", "b"])
    with pytest.raises(ValueError) as info:
        read_parallel(tmp_path, "train", "de", "en")
    expected = f"misaligned parallel files: {tmp_path}/train.de has 3 lines but {tmp_path}/train.en.gz has 2"
    assert str(info.value) == expected
    with pytest.raises(FileNotFoundError, match="no val.de or val.de.gz in"):
        read_parallel(tmp_path, "val", "de", "en")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        ParallelTextDataModule(tmp_path / "nowhere", "de", "en").setup("fit")


def test_token_batches_cover_everything_and_split_evenly_across_ranks():
    rng = np.random.default_rng(0)
    src_len = rng.integers(2, 60, 1000)
    tgt_len = src_len + rng.integers(0, 4, 1000)  # translations are about as long as their sources
    sampler = TokenBatchSampler(range(1000), src_len, tgt_len, max_tokens=500, shuffle=True, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) * max(src_len[b].max(), tgt_len[b].max()) <= 500 for b in batches)
    padding = sum(len(b) * src_len[b].max() - src_len[b].sum() for b in batches) / src_len.sum()
    assert padding < 0.1, "sorting by length keeps padding low"
    ranks = [list(TokenBatchSampler(torch.utils.data.DistributedSampler(range(1000), num_replicas=2, rank=r),
                                    src_len, tgt_len, 500, seed=1)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(sampler) // 2 + len(sampler) % 2  # equal steps on every rank
    assert {i for r in ranks for b in r for i in b} == set(range(1000))


def test_parallel_text_fit_then_test_reuses_the_checkpoint_tokenizer(tmp_path, monkeypatch):
    root = _corpus(tmp_path / "corpus")
    args = ["--config", REVERSE, *QUIET, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",  # samples as markdown files under log_dir
            "--data=lit_papers.data.translation.ParallelTextDataModule", f"--data.root={root}", "--data.src_lang=de",
            "--data.tgt_lang=en", "--data.vocab_size=300", "--data.min_frequency=1", "--data.max_tokens=200",
            "--model.init_args.net.init_args.src_vocab_size=300", "--model.init_args.max_len_offset=3"]
    cli = main(["fit", *args])
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "tokenizer.json").is_file() and list((log_dir / "samples").glob("val_samples_*.md"))
    saved = Tokenizer.from_file(str(log_dir / "tokenizer.json")).to_str()

    def no_training(*_, **__):
        raise AssertionError("the tokenizer must come from the checkpoint")

    monkeypatch.setattr(data, "train_bpe", no_training)
    tested = main(["test", *args, f"--ckpt_path={cli.trainer.checkpoint_callback.last_model_path}"])
    assert tested.datamodule.tokenizer.to_str() == saved and "test/bleu" in tested.trainer.callback_metrics


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size: data 13 exceeds the net's src_vocab_size 10"):
        main(["fit", "--config", REVERSE, *QUIET, "--model.init_args.net.init_args.src_vocab_size=10"])


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="the Multi30k corpus is not on this machine")
def test_multi30k_layout_reads():
    dm = ParallelTextDataModule(MULTI30K, "de", "en", test_prefix="test_2016_flickr", vocab_size=2000)
    dm.setup("fit"), dm.setup("test")
    assert [len(dm._split_text(s)[0]) for s in ("train", "val", "test")] == [29000, 1014, 1000]
    val = next(iter(dm.val_dataloader()))
    assert dm.decode(val["tgt"].tolist()) == val["tgt_text"]  # byte-level BPE: decoding gives the references back


# ---------------------------------------------------------------- the synthetic task through the CLI


def test_reversal_learns_and_checkpoints_reload():
    cli = main(["fit", "--config", REVERSE, *QUIET, "--trainer.max_epochs=1"])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/ppl", "val/bleu", "val/exact_match"} <= set(metrics)
    assert float(metrics["val/bleu"]) > 50 and float(metrics["val/exact_match"]) > 0.3, "one epoch: most of the way"
    restored = Translation.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path).eval()
    src = next(iter(cli.datamodule.val_dataloader()))["src"]
    assert restored.generate(src) == cli.model.eval().generate(src)


@pytest.mark.slow
def test_reversal_is_solved_exactly():
    cli = main(["fit", "--config", REVERSE, *QUIET])
    assert float(cli.trainer.callback_metrics["val/exact_match"]) == 1.0  # greedy, every sequence
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert results[0]["test/exact_match"] == 1.0  # beam search (4, alpha 0.6)
