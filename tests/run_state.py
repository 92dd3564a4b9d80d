"""What a resumed run must match bitwise: the training state of a CLI run, and a recursive exact comparison."""

from __future__ import annotations

import torch


def training_state(cli) -> dict:
    """Everything that must match: weights and buffers, optimizer and scheduler states, the step counters."""
    return {
        "model": cli.model.state_dict(),
        "optimizers": [opt.state_dict() for opt in cli.trainer.optimizers],
        "schedulers": [config.scheduler.state_dict() for config in cli.trainer.lr_scheduler_configs],
        "global_step": cli.trainer.global_step,
        "epoch": cli.trainer.current_epoch,
    }


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """torch.equal on every tensor, == on everything else, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"
