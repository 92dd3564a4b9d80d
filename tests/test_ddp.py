"""Two-process CPU DDP (gloo) against one process at the same global batch (8 x 2 vs 16 x 1): the classifier's
weights and validation metrics, MAE's and the GAN's losses; disjoint, seeded shards; every validation sample scored
exactly once; evaluation means over shards of different sizes equal to the one-process means (classifier, MAE, GAN,
Transformer); the GAN's k discriminator steps per generator step; a NaN loss on one rank stops or skips the step on
both, without a hang.

The two processes are started the way `torchrun` starts them (see `tests/_ddp_run.py`), each with a timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import _ddp_run as runs
import pytest
import torch
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "_ddp_run.py"
TIMEOUT_S = 240  # far above the ~10-30 s the runs take: reaching it means a hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, *scenarios: str) -> dict[str, list[dict]]:
    """Run `scenarios` in two DDP processes; return each scenario's per-rank results, rank 0 first."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "NODE_RANK": "0", "OMP_NUM_THREADS": "1"}
    logs = [open(out_dir / f"rank{rank}.log", "w") for rank in (0, 1)]  # noqa: SIM115 -- open while they run
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(out_dir), *scenarios], stdout=logs[rank],
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              start_new_session=True) for rank in (0, 1)]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"the DDP processes hung for {TIMEOUT_S} s; logs in {out_dir}")
    finally:
        for log in logs:
            log.close()
    logs = "\n".join((out_dir / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs
    return {s: [json.loads((out_dir / f"{s}.rank{r}.json").read_text()) for r in (0, 1)] for s in scenarios}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, list[dict]]:
    return launch(tmp_path_factory.mktemp("ddp"), "classifier", "gan_k_steps", "translation", "nan_skip", "nan_stop")


@pytest.fixture(scope="module")
def single() -> dict:
    return runs.classifier(world_size=1)


@pytest.fixture(scope="module")
def ddp_mae_gan(tmp_path_factory) -> dict[str, list[dict]]:
    return launch(tmp_path_factory.mktemp("ddp_mae_gan"), "mae", "gan")


def test_classifier_matches_one_process_at_the_same_global_batch(ddp, single):
    ranks = ddp["classifier"]
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == single["global_step"] == 100
    assert ranks[0]["params"] == ranks[1]["params"], "DDP keeps the replicas identical"
    # Averaging the two ranks' gradients of 8-sample means is the gradient of the 16-sample mean: after 100 SGD steps
    # the weights agree to float rounding.
    torch.testing.assert_close(torch.tensor(ranks[0]["params"]), torch.tensor(single["params"]), rtol=1e-4, atol=1e-5)
    for r in ranks:
        assert r["metrics"]["val/acc1"] == single["metrics"]["val/acc1"]  # torchmetrics: counts summed over ranks
        # A batch-weighted torchmetrics mean, summed over the ranks: the single-process loss (the weights agree to 1e-4).
        assert r["metrics"]["val/loss"] == pytest.approx(single["metrics"]["val/loss"], rel=1e-4)


def test_shards_are_disjoint_seeded_and_together_make_the_global_batch(ddp, single):
    ranks = ddp["classifier"]
    first = [r["first_batch"] for r in ranks]
    assert [r["sampler"] for r in ranks] == ["DistributedSampler"] * 2
    assert len(first[0]) == len(first[1]) == 8 and not set(first[0]) & set(first[1])
    # Lightning's DistributedSampler, seeded by seed_everything: a permutation shared by the ranks, of which rank r
    # takes every other index, so the ranks' first batches are the one-process first batch of 16, interleaved.
    assert first[0] == single["first_batch"][0::2] and first[1] == single["first_batch"][1::2]


def test_ranks_draw_different_random_numbers(ddp):
    """MAE masks, dropout, MixUp and batch-side crops come from the global stream: each rank needs its own."""
    draws = [r["draw"] for r in ddp["classifier"]]
    assert draws[0] != draws[1]


def test_validation_scores_every_sample_exactly_once(ddp, single):
    ranks = ddp["classifier"]
    n_val = 189  # odd: a padding DistributedSampler would score one sample twice
    assert single["val_samples"] == n_val
    assert sorted(r["val_samples"] for r in ranks) == [94, 95]


def test_gan_takes_k_discriminator_steps_per_generator_step_on_each_rank(ddp):
    ranks = ddp["gan_k_steps"]
    for r in ranks:  # 40 points and 4 batches per rank, k = 2
        assert r["world_size"] == 2 and (r["d_steps"], r["g_steps"], r["global_step"]) == (4, 2, 6)
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6), "DDP keeps both nets in sync"
    assert ranks[0]["first_noise"] != ranks[1]["first_noise"], "each process draws its own noise"
    real = [v for r in ranks for batch in r["real_batches"] for v in batch]
    assert sorted(real) == [1000.0 + i for i in range(80)], "the processes split the data between them"


def test_translation_loss_is_the_one_process_mean_over_shards_of_different_token_counts(ddp):
    ranks, single = ddp["translation"], runs.translation(world_size=1)
    # 8 token batches of different sizes: each rank scores every other one, none twice.
    assert single["num_batches"] == 8 and sorted(b for r in ranks for b in r["batches"]) == sorted(single["batches"])
    for r in ranks:
        for key in ("val/loss", "val/ppl"):  # means per target token: the ranks hold 192 and 151
            assert r["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-6)


def test_nonfinite_loss_on_one_rank_skips_the_step_on_both(ddp):
    ranks = ddp["nan_skip"]
    for r in ranks:
        assert r["skipped_steps"] == 1 and r["metrics"]["train/skipped_steps"] == 1.0 and r["global_step"] == 6
        before = r["before"]  # parameters before each of the 6 batches
        assert before[runs.NAN_STEP + 1] == before[runs.NAN_STEP], "the NaN step changed no weight"
        assert all(before[i + 1] != before[i] for i in range(5) if i != runs.NAN_STEP)
    assert ranks[0]["params"] == ranks[1]["params"]


def test_nonfinite_loss_on_one_rank_stops_both(ddp):
    ranks = ddp["nan_stop"]
    step = f"at global step {runs.NAN_STEP} (epoch 0)"
    assert ranks[1]["error"].startswith(f"loss nan {step}")  # rank 1 saw the NaN
    assert ranks[0]["error"].startswith(f"a non-finite loss on another process {step}")
    assert [r["steps_done"] for r in ranks] == [runs.NAN_STEP + 1] * 2


@pytest.mark.slow  # two more processes and two small fits: ~30 s on 2 shared cores
def test_mae_and_gan_match_one_process_within_noise(ddp_mae_gan):
    # MAE's masks and the GAN's noise are random draws, which differ between one process and two (each rank draws for
    # its own 8 samples), so these agree within sampling noise, not to rounding.
    mae_ranks, mae_single = ddp_mae_gan["mae"], runs.mae(world_size=1)
    assert sum(r["val_samples"] for r in mae_ranks) == mae_single["val_samples"] == 189
    for r in mae_ranks:
        assert r["params"] == mae_ranks[0]["params"]
        assert r["metrics"]["val/loss"] == pytest.approx(mae_single["metrics"]["val/loss"], rel=0.03)  # 1.043 vs 1.036
    gan_ranks, gan_single = ddp_mae_gan["gan"], runs.gan(world_size=1)
    assert sum(r["val_samples"] for r in gan_ranks) == gan_single["val_samples"] == 189
    for r in gan_ranks:
        assert r["params"] == gan_ranks[0]["params"] and r["global_step"] == gan_single["global_step"] == 80
        for key in ("val/d_real", "val/d_fake"):
            # measured: d_real 0.85 vs 0.75, d_fake 0.24 vs 0.18 after 40 iterations from different noise
            assert r["metrics"][key] == pytest.approx(gan_single["metrics"][key], abs=0.15)


def one_process_mean(ranks: list[dict], key: str) -> float:
    """The mean of `key` over every validation sample of both ranks, from their batches' means and sizes."""
    batches = [batch for r in ranks for batch in r["val_batches"]]
    return sum(b[key] * b["size"] for b in batches) / sum(b["size"] for b in batches)


@pytest.mark.slow  # shares the two DDP runs above
def test_mae_and_gan_evaluation_means_are_the_one_process_means(ddp_mae_gan):
    # The ranks score 95 and 94 digits. A mean of the ranks' means (`self.log(..., sync_dist=True)`) is off by
    # (m0 - m1) x (95/189 - 1/2) from the mean over all 189: measured 5e-5 to 2e-4 relative here.
    mae_ranks, gan_ranks = ddp_mae_gan["mae"], ddp_mae_gan["gan"]
    for ranks, key in ((mae_ranks, "val/loss"), (gan_ranks, "val/d_real"), (gan_ranks, "val/d_fake")):
        assert sorted(sum(b["size"] for b in r["val_batches"]) for r in ranks) == [94, 95]
        for r in ranks:
            assert r["metrics"][key] == pytest.approx(one_process_mean(ranks, key), rel=1e-6)
    # Parzen: every rank gathers the 189 digits in dataset order, so the same 60 choose sigma as in one process.
    for r in gan_ranks:
        for key, expected in r["parzen_one_process"].items():
            assert r["metrics"][key] == pytest.approx(expected, rel=1e-6)
