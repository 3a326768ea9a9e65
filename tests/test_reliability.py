"""Interrupted training, non-finite losses, untrusted checkpoint files and streaming prediction.

The end-to-end tests run the bundle's commands in subprocesses on generated data with a tiny network, as
tests/test_workflows.py does; the training process is killed with SIGKILL in the middle of an epoch.
"""

from __future__ import annotations

import csv
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.handlers import (
    AtomicCheckpointSaver,
    NonFiniteLossError,
    StopOnNonFiniteLoss,
    TrainingCheckpoint,
    atomic_save,
    load_checkpoint,
    plain,
)

from .conftest import REPO_ROOT, TINY_NETWORK_ARGS, bundle_command, predict, run_bundle, tiny_model_file


@pytest.fixture(scope="module")
def datalist_args(synthetic_dataset, synthetic_datalist) -> list[str]:
    """Training arguments for the generated data set with its fixed split."""
    return ["--dataset_dir", str(synthetic_dataset), "--datalist", str(synthetic_datalist)]


def training_args(work: Path, datalist_args: list[str], *extra: str) -> list[str]:
    return [
        "training", "--config_file", "bundle/configs/train.json", *datalist_args,
        "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval"), *TINY_NETWORK_ARGS,
        "--batch_size", "4", "--num_workers", "0", "--seed", "0", *extra,
    ]  # fmt: skip


def assert_same_tensors(first, second, where: str = "") -> None:
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second), where
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            assert_same_tensors(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert first == second, where


# ---------------------------------------------------------------------------------------------------- interruption


def test_killed_training_resumes_to_the_same_weights(tmp_path, datalist_args):
    """SIGKILL in the middle of epoch 2, ``--resume true``: the result equals an uninterrupted run's, bit for bit."""
    epochs = ["--max_epochs", "3"]
    reference = tmp_path / "reference"
    run_bundle(*training_args(reference, datalist_args, *epochs))

    work = tmp_path / "interrupted"
    checkpoint, log = work / "models" / "checkpoint.pt", tmp_path / "killed.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as stream:
        process = subprocess.Popen(
            bundle_command(*training_args(work, datalist_args, *epochs)),
            cwd=REPO_ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            while not checkpoint.exists():  # epoch 1 is done
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.01)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not re.search(r"Epoch \[2/3\]: \[[1-9]\d*/", log.read_text()):
                time.sleep(0.01)  # the progress bar shows an iteration of epoch 2
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted = torch.load(checkpoint, weights_only=True)
    assert interrupted["epoch"] == 1 and interrupted["iteration"] == interrupted["trainer"]["epoch_length"]
    assert torch.load(work / "models" / "model.pt", weights_only=True).keys() == {"model"}

    resumed = run_bundle(*training_args(work, datalist_args, *epochs, "--resume", "true"))
    assert "resumed from" in resumed.stderr + resumed.stdout
    expected = torch.load(reference / "models" / "checkpoint.pt", weights_only=True)
    final = torch.load(checkpoint, weights_only=True)
    assert final["epoch"] == expected["epoch"] == 3
    states = ("model", "optimizer", "lr_scheduler", "validator", "early_stop", "best_model", "trainer", "random_states")
    for key in states:
        assert_same_tensors(final[key], expected[key], key)
    assert_same_tensors(
        torch.load(work / "models" / "model.pt", weights_only=True),
        torch.load(reference / "models" / "model.pt", weights_only=True),
        "model.pt",
    )
    assert sorted(p.name for p in (work / "models").iterdir()) == ["checkpoint.pt", "model.pt"]


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, datalist_args):
    """The warm-up (3 epochs when max_epochs >= 12) keeps epoch 1 at learning rate 0; epoch 2 at 3e29 diverges."""
    work = tmp_path / "diverging"
    result = run_bundle(*training_args(work, datalist_args, "--max_epochs", "12", "--learning_rate", "1e30"), ok=False)
    output = result.stdout + result.stderr
    assert re.search(r"training stopped: the loss is (nan|inf|-inf) at epoch 2, iteration \d+", output), output[-3000:]
    assert str(work / "models") in output
    checkpoint = torch.load(work / "models" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    best = torch.load(work / "models" / "model.pt", weights_only=True)["model"]
    for weights in (checkpoint["model"], best):
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_guard_unit():
    from ignite.engine import Engine

    guard = StopOnNonFiniteLoss(lambda output: output, checkpoint_dir="/models")
    engine = Engine(lambda e, b: float("inf") if b == 3 else 1.0)
    guard.attach(engine)
    with pytest.raises(NonFiniteLossError, match=r"the loss is inf at epoch 1, iteration 3.*/models"):
        engine.run([1, 2, 3, 4], max_epochs=1)


# ---------------------------------------------------------------------------------------------- atomic checkpoints


def test_atomic_save_keeps_the_previous_file_when_saving_fails(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    atomic_save({"model": {"w": torch.ones(3)}}, target)

    def failing_save(obj, file, *args, **kwargs):
        with open(file, "wb") as stream:
            stream.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"model": {"w": torch.zeros(3)}}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_best_model_is_replaced_atomically_never_deleted_first(tmp_path, monkeypatch):
    """MONAI's saver deletes model.pt before writing the better one; this one keeps it until the new one is in place."""
    from ignite.engine import Engine, Events

    torch.manual_seed(0)
    network = torch.nn.Linear(2, 1)
    scores = iter([0.1, 0.5, 0.9])
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def score(e):
        e.state.metrics = {"val": next(scores)}
        e.state.key_metric_name = "val"

    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": network}, save_key_metric=True, key_metric_filename="model.pt"
    )
    saver.attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def change_weights(e):
        with torch.no_grad():
            network.weight += 1

    engine.run([0], max_epochs=2)
    first = torch.load(tmp_path / "model.pt", weights_only=True)
    assert first.keys() == {"model"} and torch.allclose(first["model"]["weight"], network.weight.detach() - 1)
    assert saver.state_dict() == {"_saved": [(0.5, "model_key_metric=0.5000.pt")]}

    import scripts.handlers as handlers

    real_save = handlers.torch.save

    def dying_save(obj, stream, *args, **kwargs):
        real_save(obj, stream, *args, **kwargs)
        assert (tmp_path / "model.pt").exists()  # the previous best is still there while the new one is written
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(handlers.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=3)
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(kept["model"]["weight"], first["model"]["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_checkpoint_content_is_weights_only_loadable(tmp_path):
    state = plain({"a": np.float64(0.5), "b": np.arange(3), "c": (1, "x", None), "d": [torch.ones(1)]})
    atomic_save(state, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["a"] == 0.5 and torch.equal(loaded["b"], torch.arange(3)) and loaded["c"] == (1, "x", None)
    with pytest.raises(TypeError, match=r"checkpoint.f: function"):
        plain({"f": lambda: None})


def test_resume_flag_text_and_missing_checkpoint(tmp_path, caplog):
    from ignite.engine import Engine

    assert TrainingCheckpoint(tmp_path / "c.pt", {}, resume="false").resume is False
    assert TrainingCheckpoint(tmp_path / "c.pt", {}, resume="true").resume is True
    with pytest.raises(ValueError, match="resume must be true or false"):
        TrainingCheckpoint(tmp_path / "c.pt", {}, resume="maybe")
    engine = Engine(lambda e, b: None)
    TrainingCheckpoint(tmp_path / "c.pt", {}, resume=True).attach(engine)
    engine.run([0], max_epochs=1)
    assert "does not exist, starting from scratch" in caplog.text


def test_resuming_an_early_stopped_run_trains_no_further(tmp_path):
    from ignite.engine import Engine, Events

    network = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    # early stopping terminates the trainer from the validation handler, which runs before the checkpoint handler
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())
    TrainingCheckpoint(tmp_path / "c.pt", {"model": network}).attach(engine)
    engine.run([0, 0], max_epochs=5)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["stopped_early"] is True

    resumed = Engine(lambda e, b: None)
    epochs = []
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    TrainingCheckpoint(tmp_path / "c.pt", {"model": network}, resume=True).attach(resumed)
    resumed.run([0, 0], max_epochs=5)
    assert epochs == [] and resumed.state.epoch == 2


def test_resuming_an_early_stopped_run_with_more_patience_trains_on(tmp_path):
    from ignite.engine import Engine, Events
    from monai.handlers import EarlyStopHandler

    network = torch.nn.Linear(2, 1)

    def run(patience: int, resume: bool) -> tuple[list[int], Engine]:
        engine = Engine(lambda e, b: None)
        epochs: list[int] = []
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
        # a constant score never improves: the run stops once ``patience`` epochs followed the first
        stopper = EarlyStopHandler(patience=patience, score_function=lambda e: 0.0, trainer=engine)
        stopper.attach(engine)
        TrainingCheckpoint(tmp_path / "c.pt", {"model": network, "early_stop": stopper}, resume=resume).attach(engine)
        engine.run([0, 0], max_epochs=10)
        return epochs, engine

    assert run(patience=1, resume=False)[0] == [1, 2]
    assert run(patience=1, resume=True)[0] == []
    epochs, engine = run(patience=3, resume=True)
    assert epochs == [3, 4] and engine.state.epoch == 4


# ------------------------------------------------------------------------------------------------- untrusted files


class CodeRunningPayload:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model": CodeRunningPayload(marker)}, evil)  # a torch (zip) checkpoint
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"model": CodeRunningPayload(marker)}))  # a plain pickle named .pt
    torch.load(evil, weights_only=False)  # the payload is real: a trusting loader runs it
    assert marker.read_text() == "code ran"
    marker.unlink()

    for path in (evil, legacy):
        with pytest.raises(ValueError, match="refused to load this checkpoint"):
            load_checkpoint(path)
    # resuming from a planted checkpoint.pt
    from ignite.engine import Engine

    (tmp_path / "models").mkdir()
    evil.rename(tmp_path / "models" / "checkpoint.pt")
    engine = Engine(lambda e, b: None)
    planted = tmp_path / "models" / "checkpoint.pt"
    TrainingCheckpoint(planted, {"model": torch.nn.Linear(1, 1)}, resume=True).attach(engine)
    with pytest.raises(ValueError, match="refused"):
        engine.run([0], max_epochs=1)
    # the inference workflow (MONAI's CheckpointLoader, weights_only=True)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((40, 50), 100, np.uint8)).save(inputs / "a.png")
    result = predict(inputs, tmp_path / "out", legacy, ok=False)
    assert "Weights only load failed" in result.stderr or "UnpicklingError" in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ streaming


def _write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / f"img {index:04d}.png")


def test_prediction_streams_with_bounded_memory(tmp_path):
    """Peak RSS for 300 images stays within a few MiB of that for 60: nothing per image is kept in memory.

    (bundle/docs/reliability.md reports 100 vs 1000 images with the full network.)
    """
    model = tiny_model_file(tmp_path / "model.pt")
    peaks = {}
    for count in (60, 300):
        inputs, out, rss = tmp_path / f"in{count}", tmp_path / f"out{count}", tmp_path / f"rss{count}"
        _write_images(inputs, count)
        predict(inputs, out, model, "--amp", "False", rss_file=rss)
        with open(out / "predictions.csv", newline="") as stream:
            assert len(list(csv.DictReader(stream))) == count
        peaks[count] = int(rss.read_text()) / 1024  # MiB
    growth = peaks[300] - peaks[60]
    print(f"peak RSS: 60 images {peaks[60]:.0f} MiB, 300 images {peaks[300]:.0f} MiB, growth {growth:.1f} MiB")
    assert growth < 8, peaks  # catches anything above ~35 kB kept per image
