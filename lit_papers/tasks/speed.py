"""GPU fast paths every image task offers as options: channels-last memory format and `torch.compile` of the net.

Mixed precision is not a task option: it is the Trainer's `precision` flag (`bf16-mixed`, `16-mixed`), which runs the
forward pass under autocast. The tasks compute their losses and log-probabilities in float32 from there (autocast on
CUDA does this for `log_softmax`, autocast on CPU does not, so the tasks cast explicitly).
Both options cost nothing when off; on CPU they work but rarely pay (compilation takes minutes for large nets).
"""

from __future__ import annotations

import torch
from torch import nn


class FastPathsMixin:
    """LightningModule mixin for tasks whose architecture is `self.net`: call `set_fast_paths` in `__init__`.

    - `channels_last`: convolution weights in NHWC layout, what tensor cores read without a transpose (cuDNN's fast
      path for conv nets under bf16/fp16). A convolution takes the NHWC path when its input *or* its
      weight is channels-last, so converting the weights is enough: the first layer's output and every activation
      after it stay NHWC without copying the input batch.
    - `compile`: `torch.compile` of the net, done in place (`nn.Module.compile`) in `configure_model`, i.e. after the
      task is built and before the strategy wraps it (DDP, FSDP). The net stays the same module, so state dicts and
      checkpoints keep their parameter names (no `_orig_mod.` prefix) and load into uncompiled tasks. Compilation
      happens at the first training step; switching to evaluation (eval mode, no grad, another batch size) compiles
      once more.
    """

    net: nn.Module

    def set_fast_paths(self, channels_last: bool = False, compile: bool = False) -> None:
        self.channels_last, self.compile_net = channels_last, compile  # `self.compile` is nn.Module's method
        if channels_last:
            self.net.to(memory_format=torch.channels_last)  # 4-D parameters only; others are unaffected

    def configure_model(self) -> None:
        # Lightning calls this hook at the start of every fit/validate/test/predict: compile once.
        if self.compile_net and not getattr(self, "_net_compiled", False):
            self.net.compile()
            self._net_compiled = True
