"""``multi_gpu_train.json`` on CPU: ``torchrun`` with 2 processes, gloo, DistributedDataParallel, tiny network.

Each rank trains on its own half of the generated data (``DistributedSampler``); identical parameters on both
ranks at the end show that DDP averaged the gradients. The validation metrics (ignite's ``sync_all_reduce``) and
the epoch at which training ended must agree across ranks, and only rank 0 may write ``model.pt`` and logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import REPO_ROOT, TINY_NETWORK_ARGS

CONFIGS = "bundle/configs/train.json", "bundle/configs/multi_gpu_train.json"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

# appended to the config's `finalize`: each rank saves its final weights, epoch and validation metrics
DUMP = {
    "+finalize": [
        "$torch.save({'model': @network.module.state_dict(), 'epoch': @train#trainer.state.epoch, "
        "'val': dict(@validate#evaluator.state.metrics), 'iterations': @train#trainer.state.iteration}, "
        "os.path.join(os.environ['RANK_DUMP_DIR'], 'rank' + os.environ['RANK'] + '.pt'))"
    ]
}

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


def test_ranks_above_0_slice_off_exactly_the_logging_and_saving_handlers():
    """multi_gpu_train.json slices the handler lists: what it cuts on ranks > 0 must be what only rank 0 runs."""
    train = json.loads((REPO_ROOT / CONFIGS[0]).read_text())
    multi_gpu = json.loads((REPO_ROOT / CONFIGS[1]).read_text())
    above_0 = "torch.distributed.get_rank() > 0"
    assert multi_gpu["train#trainer#train_handlers"] == f"$@train#handlers[: -3 if {above_0} else None]"
    assert [h["_target_"] for h in train["train"]["handlers"][-3:]] == [
        "StatsHandler", "TensorBoardStatsHandler", "ignite.handlers.ProgressBar"
    ]  # fmt: skip
    assert "TrainingCheckpoint" in train["train"]["handlers"][-4]["_target_"]  # every rank resumes from it
    assert multi_gpu["validate#evaluator#val_handlers"] == f"$@validate#handlers[: 1 if {above_0} else None]"
    assert train["validate"]["handlers"][0] == "@validate#early_stop"  # every rank stops at the same epoch


@needs_gloo
def test_two_processes_end_with_identical_weights(tmp_path, synthetic_dataset, synthetic_datalist):
    dump_config = tmp_path / "dump.json"
    dump_config.write_text(json.dumps(DUMP))
    ckpt_dir, output_dir = tmp_path / "models", tmp_path / "eval"
    config_files = str([*CONFIGS, str(dump_config)])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "-m", "monai.bundle", "run", "training", "--config_file", config_files,
        "--dataset_dir", str(synthetic_dataset), "--datalist", str(synthetic_datalist),
        "--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir), *TINY_NETWORK_ARGS,
        "--max_epochs", "3", "--batch_size", "4", "--num_workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RANK_DUMP_DIR": str(tmp_path)}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == 3
    assert ranks[0]["iterations"] == ranks[1]["iterations"] > 0  # DistributedSampler(even_divisible=True)
    assert ranks[0]["val"] == ranks[1]["val"] and "val_score" in ranks[0]["val"]  # metrics reduced over ranks
    weights = [r["model"] for r in ranks]
    assert set(weights[0]) == set(weights[1])
    parameters = [k for k in weights[0] if not k.endswith(BN_BUFFERS)]
    assert len(parameters) > 10
    for key in parameters:  # different data on each rank: equal only because DDP averaged the gradients
        assert torch.equal(weights[0][key], weights[1][key]), key
    # BatchNorm running statistics are buffers: DDP broadcasts rank 0's at each training step, then every rank
    # updates them with its own batch, so they differ slightly at the end; model.pt holds rank 0's.

    saved = torch.load(ckpt_dir / "model.pt", weights_only=True)
    assert set(saved) == {"model"} and set(saved["model"]) == set(weights[0])  # no DDP "module." prefix
    assert (ckpt_dir / "checkpoint.pt").is_file()
    # every rank builds the handler lists (so each TensorBoard handler opens an empty event file), but only rank 0
    # attaches the loggers: scalars come from one process only
    writers = {}
    for name in os.listdir(output_dir):
        events = EventAccumulator(str(output_dir / name))
        events.Reload()
        if events.Tags()["scalars"]:
            writers.setdefault(name.split(".")[-2], set()).update(events.Tags()["scalars"])
    assert len(writers) == 1, f"TensorBoard scalars written by {len(writers)} processes: {writers}"
    assert {"train_loss", "val_score"} <= next(iter(writers.values()))
    assert result.stdout.count("Key metric: val_score best value") + result.stderr.count(
        "Key metric: val_score best value"
    ) == 3, "validation logged by rank 0 only, once per epoch"
