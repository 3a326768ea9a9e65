"""Training throughput of one configuration: the bundle's training workflow, or a two-model MONAI pipeline.

Runs ``bundle/configs/train.json`` (plus overrides, exactly like ``python -m monai.bundle run training``) for a
few epochs in this process, with timers attached to the trainer and the validator, and writes a JSON summary:

- ``cache_s``: building the workflow, i.e. the ``CacheDataset`` of the deterministic preprocessing (train + val);
- per epoch: ``train_s`` (first iteration start to last iteration end), ``images``, ``images_per_s``, and its
  parts: ``data_wait_s`` (the trainer waiting for the data loader), ``network_s`` (batch to device, forward, loss,
  backward, optimizer step) and ``other_s`` (postprocessing, training metrics, handlers); ``val_s``, ``epoch_s``
  (epoch start to after validation and checkpointing), and the validation metrics.

``--mode unet`` / ``--mode densenet`` train, on the same data loader (same cache, augmentation and loader
settings), what a user might assemble instead of the multi-task network: MONAI ``UNet`` with ``DiceCELoss``
for the segmentation, MONAI ``DenseNet121`` with cross-entropy for the classification, each a plain
``SupervisedTrainer`` (float32: MONAI's engines autocast on CUDA only), no validation.

Usage (one configuration; ``bench/run_all.py`` runs them all)::

    python bench/train_bench.py --dataset_dir DIR --epochs 3 --out result.json --override '{"amp": false}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import BUNDLE_ROOT, REPO_ROOT, busy_cpu_s, machine, median, tree_cpu_s, write_json


class Timer:
    """Ignite handlers that time the epochs, iterations, data waits and validation runs."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.current: dict = {}

    def attach(self, trainer, validator=None) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        trainer.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self.batch_started)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self.batch_completed)
        trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, self.model_completed)
        # first in line: before MONAI's decollate + postprocessing handler, so that the rest of the iteration
        # (postprocessing, metrics, other handlers) is timed apart from the network step
        trainer._event_handlers[IterationEvents.MODEL_COMPLETED].insert(
            0, trainer._event_handlers[IterationEvents.MODEL_COMPLETED].pop()
        )
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)  # last: after validation, saving
        if validator is not None:
            validator.add_event_handler(Events.STARTED, self.validation_started)
            validator.add_event_handler(Events.COMPLETED, self.validation_completed)
        self.validator = validator

    def epoch_started(self, engine) -> None:
        self.current = {"start": time.perf_counter(), "images": 0, "data_wait_s": 0.0, "network_s": 0.0,
                        "val_s": 0.0, "steps": [], "busy": busy_cpu_s(), "own": tree_cpu_s(os.getpid())}  # fmt: skip
        self.last = self.current["start"]

    def batch_started(self, engine) -> None:
        self.wait_start = time.perf_counter()

    def batch_completed(self, engine) -> None:
        self.batch_ready = time.perf_counter()
        self.current["data_wait_s"] += self.batch_ready - self.wait_start

    def model_completed(self, engine) -> None:
        self.current["network_s"] += time.perf_counter() - self.batch_ready

    def iteration_completed(self, engine) -> None:
        now = time.perf_counter()
        batch = engine.state.batch  # MONAI decollates it into a list of items after the iteration
        if isinstance(batch, dict):
            batch = batch["image"]
        elif isinstance(batch, tuple):
            batch = batch[0]
        self.current["images"] += len(batch)
        self.current["steps"].append(now - self.last)
        self.current["end"] = self.last = now

    def validation_started(self, engine) -> None:
        self.val_start = time.perf_counter()

    def validation_completed(self, engine) -> None:
        self.current["val_s"] += time.perf_counter() - self.val_start

    def epoch_completed(self, engine) -> None:
        now = time.perf_counter()
        c = self.current
        train_s = c["end"] - c["start"]
        entry = {
            "epoch": engine.state.epoch,
            "images": c["images"],
            "train_s": train_s,
            "images_per_s": c["images"] / train_s,
            "median_step_s": median(c["steps"]),
            "data_wait_s": c["data_wait_s"],
            "network_s": c["network_s"],
            "other_s": train_s - c["data_wait_s"] - c["network_s"],
            "val_s": c["val_s"],
            "epoch_s": now - c["start"],
            # CPU other processes of the machine used during the epoch, in cores (0: otherwise idle)
            "other_cores": max(0.0, (busy_cpu_s() - c["busy"]) - (tree_cpu_s(os.getpid()) - c["own"]))
            / (now - c["start"]),
        }
        if self.validator is not None:
            entry["val_metrics"] = {k: float(v) for k, v in self.validator.state.metrics.items()}
        entry["train_metrics"] = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        self.epochs.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "steps"}), flush=True)


CLEAN_OTHER_CORES = 0.15


def summarise(epochs: list[dict]) -> dict:
    """Medians over the epochs after the first (the first pays for worker start-up and kernel selection), leaving
    out epochs during which other processes used more than ``CLEAN_OTHER_CORES`` cores (unless all did)."""
    steady = epochs[1:] if len(epochs) > 1 else epochs
    clean = [e for e in steady if e.get("other_cores", 0.0) < CLEAN_OTHER_CORES]
    used = clean or steady
    keys = ("images_per_s", "train_s", "epoch_s", "val_s", "data_wait_s", "network_s", "other_s", "median_step_s",
            "other_cores")  # fmt: skip
    summary = {key: median([e.get(key, float("nan")) for e in used]) for key in keys}
    summary["epochs_used"] = [e["epoch"] for e in used]
    summary["contended_epochs"] = [e["epoch"] for e in steady if e not in clean]
    return summary


def count_parameters(network) -> int:
    module = getattr(network, "module", network)
    return int(sum(p.numel() for p in module.parameters()))


def build_parser(args, work: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join("bundle", "configs", name) for name in args.configs])
    overrides = {
        "dataset_dir": args.dataset_dir,
        "max_epochs": args.epochs,
        "ckpt_dir": os.path.join(work, "models"),
        "output_dir": os.path.join(work, "eval"),
        **json.loads(args.override),
    }
    if args.epoch_length:
        overrides["train#trainer#epoch_length"] = args.epoch_length
    if args.datalist:
        overrides["datalist"] = args.datalist
    parser.update(overrides)
    parser.parse(True)
    return parser, overrides


def run_bundle(parser, no_meta: bool = False) -> dict:
    start = time.perf_counter()
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")  # builds both CacheDatasets
    validator = parser.get_parsed_content("validate#evaluator")
    cache_s = time.perf_counter() - start
    if no_meta:
        import monai

        monai.data.set_track_meta(False)
    timer = Timer()
    timer.attach(trainer, validator)
    parser.get_parsed_content("run")
    # what amp "auto" chose (scripts.inferers.decide_autocast), decided at the first batch
    autocast = getattr(trainer.inferer, "enabled", None)
    return {"cache_s": cache_s, "epochs": timer.epochs, "parameters": count_parameters(trainer.network),
            "autocast": autocast}  # fmt: skip


def two_model_parts(kind: str):
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import DenseNet121, UNet

    from scripts.transforms import class_from_label_map

    if kind == "unet":
        network = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(16, 32, 64, 128, 256),
                       strides=(2, 2, 2, 2), num_res_units=2)  # fmt: skip
        loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

        def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
            return batch["image"].as_tensor().to(device), batch["label"].as_tensor().to(device)

    else:
        network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
        loss = torch.nn.CrossEntropyLoss()

        def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
            return batch["image"].as_tensor().to(device), class_from_label_map(batch["label"].as_tensor()).to(device)

    return network, loss, prepare_batch


def run_two_model(parser, kind: str, epochs: int, epoch_length: int = 0) -> dict:
    import torch
    from monai.engines import SupervisedTrainer
    from monai.inferers import SimpleInferer

    start = time.perf_counter()
    parser.get_parsed_content("initialize")
    loader = parser.get_parsed_content("train#dataloader")
    cache_s = time.perf_counter() - start
    network, loss, prepare_batch = two_model_parts(kind)
    device = parser.get_parsed_content("device")
    network = network.to(device)
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=loader, network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4), loss_function=loss,
        inferer=SimpleInferer(), prepare_batch=prepare_batch, amp=False, epoch_length=epoch_length or None,
    )  # fmt: skip
    timer = Timer()
    timer.attach(trainer)
    trainer.run()
    return {"cache_s": cache_s, "epochs": timer.epochs, "parameters": count_parameters(network)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--datalist", default=None, help="datalist JSON (default: the config's)")
    ap.add_argument("--configs", nargs="+", default=["train.json"], help="config files under bundle/configs")
    ap.add_argument("--override", default="{}", help="JSON dict of config overrides")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mode", choices=("bundle", "unet", "densenet"), default="bundle")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--epoch_length", type=int, default=0, help="iterations per epoch (0: the whole data set)")
    ap.add_argument("--no_meta_after_cache", action="store_true",
                    help="monai.data.set_track_meta(False) once the caches are built (plain tensors per epoch)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    os.chdir(REPO_ROOT)
    sys.path.insert(0, str(BUNDLE_ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="train_bench_") as work:
        parser, overrides = build_parser(args, work)
        if args.mode == "bundle":
            result = run_bundle(parser, args.no_meta_after_cache)
        else:
            result = run_two_model(parser, args.mode, args.epochs, args.epoch_length)
    result.update(
        mode=args.mode, configs=args.configs, overrides={k: v for k, v in overrides.items() if k != "ckpt_dir"},
        threads=torch.get_num_threads(), machine=machine(), summary=summarise(result["epochs"]),
        image_size=list(parser["image_size"]), max_epochs=int(parser["max_epochs"]),
    )  # fmt: skip
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
