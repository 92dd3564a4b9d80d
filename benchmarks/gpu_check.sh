#!/usr/bin/env bash
# One GPU check of the fast paths, under 8 minutes on one GPU: training images/s and MFU (bf16-mixed) of
#   1. ResNet-50, channels_last + torch.compile + fused SGD, synthetic 224x224 data held on the GPU;
#   2. MAE ViT-B/16 pre-training (mask 0.75), compiled, fused AdamW, synthetic data on the GPU;
#   3. AlexNet with GPU-side augmentation: JPEG folders decoded by loader workers, crop/flip/lighting on the GPU;
#   4. a CIFAR-10 ResNet-20 epoch with the whole (synthetic, official-format) dataset on the GPU;
#   5. the task-overhead and nets benchmarks on the GPU (ratios to a raw PyTorch loop, torchvision and timm);
#   6. with 2 GPUs, a 2-process DDP smoke run of the quickstart config (dataset on the GPUs).
# All in bf16-mixed. Each figure is the second of two epochs, so compilation and cudnn autotuning are left out. MFU
# counts the forward multiply-adds with torch's FLOP counter and uses the GPU's dense bf16 peak.
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh  # CPU, tiny sizes, no compile: checks the script (tests do this)
# Goals on an A100 (312 TFLOP/s bf16), to scale by the GPU's bf16 peak: ResNet-50 >= 2,470 images/s (NVIDIA's
# reference figure), MAE ViT-B/16 >= 2,000 images/s.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
DRY=${GPU_CHECK_DRY_RUN:-0}

if [[ $DRY != 1 ]]; then
  if ! gpus=$(nvidia-smi -L 2>/dev/null) || [[ -z $gpus ]]; then
    echo "gpu_check: no NVIDIA GPU found (nvidia-smi -L); nothing to measure. GPU_CHECK_DRY_RUN=1 runs it on CPU."
    exit 0
  fi
  echo "$gpus"
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

status=0
timeout 300 python - "$WORK" <<'PY' || status=$?  # the time limits keep the whole check under 8 minutes
import functools
import logging
import os
import pickle
import sys
from multiprocessing import Pool
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from lit_papers.callbacks.throughput import Throughput, forward_macs
from lit_papers.data.cifar import CIFAR10DataModule
from lit_papers.data.imagenet import ImageNetDataModule
from lit_papers.data.on_device import DeviceLoader
from lit_papers.data.transforms import BatchAugment, DatasetStats
from lit_papers.nets.alexnet import AlexNet
from lit_papers.nets.mae import mae_vit_base_patch16, mae_vit_micro_patch4_32
from lit_papers.nets.resnet import cifar_resnet20, resnet50
from lit_papers.tasks.classification import ImageClassifier
from lit_papers.tasks.mae import MAEPretraining

DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
WORK = Path(sys.argv[1])
DEVICE = torch.device("cpu" if DRY else "cuda")
COMPILE = not DRY  # inductor on CPU takes minutes; the dry run checks the script, not the compiler
torch.set_float32_matmul_precision("high")
torch.manual_seed(0)  # the same synthetic data and weights every time (the tiny dry-run ResNet-50 can diverge on others)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # only the figures below
COMPILED = " compiled" if COMPILE else ""
SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
ADAMW = functools.partial(torch.optim.AdamW, betas=(0.9, 0.95), weight_decay=0.05, fused=True)


FAILED = []


def measure(name: str, task: L.LightningModule, macs: float, steps: int | None, **data) -> None:
    """Fit two epochs of `steps` batches (None: whole epochs) and print the second one's images/s and MFU."""
    trainer = L.Trainer(
        accelerator=DEVICE.type, devices=1, precision="bf16-mixed", max_epochs=2, limit_train_batches=steps or 1.0,
        limit_val_batches=0, num_sanity_val_steps=0, benchmark=True, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Throughput(macs_per_image=macs)],
    )
    try:
        trainer.fit(task, **data)
    except Exception as err:  # one broken check must not hide the others' figures
        print(f"{name:<44} FAILED: {type(err).__name__}: {err}")
        FAILED.append(name)
        return
    metrics = trainer.callback_metrics
    mfu = f"MFU {float(metrics['perf/mfu']):6.1%}" if "perf/mfu" in metrics else "MFU n/a (no peak for this device)"
    print(f"{name:<44} {float(metrics['perf/images_per_sec']):>9,.0f} images/s  {mfu}  "
          f"({float(metrics['perf/epoch_time']):.1f} s, {macs / 1e9:.2f} GMACs/image)")


def synthetic_loader(batch: int, steps: int, size: int, num_classes: int) -> DeviceLoader:
    """`steps` batches of random uint8 images held on the device, scaled and normalised there."""
    n = batch * steps
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=DEVICE)
    labels = torch.randint(0, num_classes, (n,), device=DEVICE)
    return DeviceLoader(images, labels, BatchAugment(DatasetStats.imagenet()), batch, shuffle=True, drop_last=True,
                        device=DEVICE)


def write_jpeg(args: tuple[Path, int, int, int]) -> None:
    path, seed, w, h = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))  # smooth colours + grain
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_imagenet(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> None:
    """ImageNet-layout folders of `size` JPEGs (ImageNet's average is about 500x375)."""
    jobs = []
    for split, count in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            jobs += [(folder / f"{i}.JPEG", c * 100003 + i + (split == "val") * 7, *size) for i in range(count)]
    with Pool(os.cpu_count()) as pool:
        pool.map(write_jpeg, jobs, chunksize=64)


def write_cifar(root: Path, per_batch: int) -> None:
    """The official python-pickle layout with random images: 5 training batches and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (dry run)"
print(f"device: {name}, torch {torch.__version__}, lightning {L.__version__}, compile={COMPILE}")

# 1. ResNet-50: the NVIDIA reference setting (bf16, NHWC, synthetic data), compiled.
batch, steps, size = (2, 2, 32) if DRY else (256, 40, 224)
net = resnet50()
macs = forward_macs(net, torch.zeros(2, 3, size, size)) / 2
task = ImageClassifier(net, optimizer=SGD, channels_last=True, compile=COMPILE)
measure(f"ResNet-50 NHWC{COMPILED}, batch {batch}", task, macs, steps,
        train_dataloaders=synthetic_loader(batch, steps, size, 1000))

# 2. MAE ViT-B/16 pre-training step (75% masking).
batch, steps = (4, 2) if DRY else (256, 30)
net, size = (mae_vit_micro_patch4_32(), 32) if DRY else (mae_vit_base_patch16(), 224)
macs = forward_macs(net, torch.zeros(2, 3, size, size)) / 2
task = MAEPretraining(net, optimizer=ADAMW, log_images_every_n_epochs=0, compile=COMPILE)
measure(f"MAE {'ViT-micro' if DRY else 'ViT-B/16'} pre-training{COMPILED}, batch {batch}", task, macs, steps,
        train_dataloaders=synthetic_loader(batch, steps, size, 1000))

# 3. AlexNet, JPEGs decoded and resized by the workers, random crop/flip/lighting/normalisation on the GPU.
batch, steps, workers, crop = (4, 2, 2, 64) if DRY else (256, 15, min(16, os.cpu_count()), 224)
write_imagenet(WORK / "imagenet", classes=10, per_class=batch * steps // 10 + 1, size=(500, 375))
net = AlexNet(num_classes=10)
macs = forward_macs(net, torch.zeros(2, 3, crop, crop)) / 2
data = ImageNetDataModule(WORK / "imagenet", pipeline="alexnet", gpu_augment=True, batch_size=batch,
                          num_workers=workers, crop_size=crop, resize=crop * 8 // 7)
task = ImageClassifier(net, optimizer=SGD, channels_last=True, compile=COMPILE)
measure(f"AlexNet{COMPILED} + GPU augmentation, {workers} workers, batch {batch}", task, macs, steps, datamodule=data)

# 4. CIFAR-10 ResNet-20, the whole training set on the GPU, one full epoch.
batch, per_batch = (32, 40) if DRY else (128, 10000)
write_cifar(WORK / "cifar10", per_batch)
net = cifar_resnet20()
macs = forward_macs(net, torch.zeros(2, 3, 32, 32)) / 2
data = CIFAR10DataModule(WORK / "cifar10", batch_size=batch, download=False, on_device=True)
task = ImageClassifier(net, optimizer=SGD, channels_last=True, compile=COMPILE)
measure(f"CIFAR-10 ResNet-20{COMPILED} epoch, data on GPU, batch {batch}", task, macs, None, datamodule=data)
sys.exit(1 if FAILED else 0)
PY

# 5. What the framework costs on the GPU: our task under the Trainer against a raw PyTorch loop (CIFAR ResNet-20 and
#    a tiny MLP), and our ResNet-50 and ViT-B/16 against torchvision's and timm's in bf16 + NHWC (benchmarks/README.md).
if [[ $DRY == 1 ]]; then
  common=(--device cpu --repeats 1 --warmup 1); overhead=(--steps 2); nets=(--net resnet50 --batch 1)
else
  common=(--device cuda --repeats 3); overhead=(); nets=(--batch 128 --bf16 --channels-last)
fi
timeout 80 python benchmarks/task_overhead.py "${common[@]}" "${overhead[@]}" --no-defaults || status=1
if python -c "import timm" 2>/dev/null; then
  timeout 80 python benchmarks/nets_speed.py "${common[@]}" "${nets[@]}" || status=1
else
  echo "nets_speed.py skipped: timm is not installed (pip install -e '.[dev]')"
fi

# 6. Two GPUs: the quickstart through the CLI under DDP, dataset on the GPUs.
if [[ $DRY != 1 ]] && (( $(nvidia-smi -L | wc -l) >= 2 )); then
  echo "DDP smoke run, 2 GPUs (quickstart config, 2 epochs, dataset on the GPUs):"
  if timeout 180 python -m lit_papers.cli fit --config configs/quickstart.yaml --trainer.devices 2 \
      --trainer.strategy ddp --trainer.max_epochs 2 --trainer.enable_progress_bar false \
      --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$WORK/ddp" \
      --trainer.default_root_dir "$WORK/ddp" --data.init_args.on_device true > "$WORK/ddp.log" 2>&1; then
    python - "$WORK/ddp" <<'PY'
import csv, sys
from pathlib import Path
rows = list(csv.DictReader(next(Path(sys.argv[1]).rglob("metrics.csv")).open()))
last = {k: v for row in rows for k, v in row.items() if v}
print(f"DDP 2 GPUs ok: {float(last['perf/images_per_sec']):,.0f} images/s, val/acc1 {float(last['val/acc1']):.3f}")
PY
  else
    echo "DDP smoke run FAILED; its log:"; tail -n 30 "$WORK/ddp.log"; status=1
  fi
fi
exit $status
