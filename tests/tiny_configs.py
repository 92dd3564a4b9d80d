"""The tiny CLI configs of the tests that stop and continue runs (`test_resume.py`, `test_preemption.py`): 3 epochs of
4 training steps and 2 validation batches on CPU, deterministic, keeping `last.ckpt`.

`config()` returns a fresh dict for a test to adjust; `write()` saves it as the YAML file `--config` reads.
"""

from __future__ import annotations

from pathlib import Path

import yaml

TRAINER = """
seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  deterministic: true
  max_epochs: 3
  limit_train_batches: 4
  limit_val_batches: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lit_papers.checkpointing.ModelCheckpoint
      init_args: {save_last: true}
"""

# ResNet-8 on 16 x 16 digits; random crops and MixUp make training draw random numbers.
CLASSIFIER = """
model:
  class_path: lit_papers.tasks.classification.ImageClassifier
  init_args:
    net:
      class_path: lit_papers.nets.resnet.CifarResNet
      init_args: {depth: 8, num_classes: 10}
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.05, momentum: 0.9, weight_decay: 0.0001}
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.StepLR
      init_args: {step_size: 1, gamma: 0.5}
    mixup_alpha: 0.4
data:
  class_path: lit_papers.data.digits.DigitsDataModule
  init_args: {image_size: 16, augment: true, batch_size: 16, num_workers: 0}
"""


def config(task: str = CLASSIFIER) -> dict:
    """The trainer settings above with `task` (the YAML of `model:` and `data:`), the classifier by default."""
    return yaml.safe_load(TRAINER) | yaml.safe_load(task)


def write(settings: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path
