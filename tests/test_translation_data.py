"""The translation loaders under DDP (every evaluation sentence scored once, training ranks stepping together) and the
exact resume of a translation run whose loader has worker processes."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import torch
from conftest import REPO_ROOT
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from run_state import assert_bitwise_equal, training_state
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from lit_papers.cli import main
from lit_papers.data.translation import ReverseDataModule

REVERSE = str(REPO_ROOT / "configs" / "transformer" / "reverse_tiny.yaml")


def ddp_loader(data: ReverseDataModule, hook: str, rank: int, world_size: int = 2):
    """The loader rank `rank` iterates under DDP: the DataModule's, with the sampler Lightning swaps in, rebuilt as
    Lightning rebuilds it (it records the loader's and batch sampler's arguments, then re-creates both)."""
    data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size,
                                   strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = getattr(data, hook)()
    train = hook == "train_dataloader"
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=0)
    return _update_dataloader(loader, sampler, RunningStage.TRAINING if train else RunningStage.VALIDATING)


def test_ddp_evaluation_scores_every_sentence_once_and_training_ranks_step_together():
    data = ReverseDataModule(num_train=300, num_val=301, max_tokens=80, split_seed=1)
    data.setup("fit")
    assert len(data.val_dataloader()) == 27 and len(data.train_dataloader()) == 29  # in one process: odd counts
    val = [list(ddp_loader(data, "val_dataloader", rank)) for rank in (0, 1)]
    scored = Counter(text for batches in val for batch in batches for text in batch["src_text"])
    assert scored == Counter(data.val_set.src_text), "each validation sentence once, over both ranks"
    assert [len(batches) for batches in val] == [14, 13]

    train = [ddp_loader(data, "train_dataloader", rank) for rank in (0, 1)]
    assert [len(loader) for loader in train] == [len(list(loader)) for loader in train] == [15, 15], "equal steps"
    shards = [[tuple(batch["src"][0].tolist()) for batch in loader] for loader in train]
    assert shards[0] != shards[1], "the ranks train on different batches"


def fit(root: str, *args: str):
    return main(["fit", "--config", REVERSE, f"--trainer.default_root_dir={root}", "--trainer.logger=false",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
                 "--model.init_args.net.init_args.dropout=0.1",  # random draws in training
                 "--data.init_args.num_train=600", "--data.init_args.num_val=20", "--data.init_args.num_workers=2",
                 *args])


def test_resumed_translation_run_matches_uninterrupted_run_bitwise():
    """Each epoch trains on 4 of its 6 shuffled batches, so a resumed epoch that replayed another epoch's order (as
    Lightning 2.6 alone does with workers) or restored other dropout streams would end elsewhere."""
    expected = training_state(fit("whole", "--trainer.max_epochs=3"))
    assert expected["epoch"] == 3 and expected["global_step"] == 12
    first = fit("parts", "--trainer.max_epochs=1")
    resumed = fit("parts", "--trainer.max_epochs=3", f"--ckpt_path={first.trainer.checkpoint_callback.last_model_path}")
    assert_bitwise_equal(training_state(resumed), expected)
