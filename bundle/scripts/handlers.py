"""Ignite handlers that keep training safe: atomic checkpoints, exact resume, and a stop at a non-finite loss.

Every checkpoint holds only tensors, numbers, strings, lists and dicts, and is loaded with
``torch.load(..., weights_only=True)``: a file whose pickle would run code is refused.
"""

from __future__ import annotations

import logging
import math
import os
import random
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.handlers import CheckpointSaver, EarlyStopHandler
from monai.transforms import Randomizable, Transform
from monai.utils import optional_import

from .common import as_bool, atomic_write, remove_stale_temporaries

Events, _ = optional_import("ignite.engine", name="Events")
Engine, _ = optional_import("ignite.engine", name="Engine")
DiskSaver, _ = optional_import("ignite.handlers", name="DiskSaver")
idist, _ = optional_import("ignite.distributed")

__all__ = [
    "CHECKPOINT_FORMAT", "NonFiniteLossError", "atomic_save", "load_checkpoint", "plain", "AtomicDiskSaver",
    "AtomicCheckpointSaver", "TrainingCheckpoint", "StopOnNonFiniteLoss", "random_states", "set_random_states",
]

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "breast-ultrasound-training-checkpoint/1"
PARALLEL = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :py:func:`scripts.common.atomic_write`: a kill leaves the previous file or the new one."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a ``ValueError`` names a file that is damaged or would run code.

    Args:
        path: the checkpoint.
        map_location: where the tensors go.
        mmap: map the tensors from the file instead of reading them (for a look at the keys and shapes only);
            only for torch's zip format, so that an old or foreign file fails with the unpickling error.
    """
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:
        raise ValueError(
            f"{path}: refused to load this checkpoint: it is not a plain weights-only file, or it is damaged "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Only load checkpoints "
            "you trust."
        ) from error


def plain(value: Any, where: str = "checkpoint") -> Any:
    """A state as ``torch.load(weights_only=True)`` accepts it: NumPy arrays become tensors, NumPy scalars and
    subclasses of bool, int, float and str (enums) plain values; a ``TypeError`` names an entry of any other type."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass that weights_only refuses
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if value is None:
        return None
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        items = ((k, plain(v, f"{where}.{k}")) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights-only checkpoint.")


class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` whose files are flushed to disk before they are moved into place (``atomic_write``).

    Args:
        dirname: output folder.
        filename: fixed file name, replaced by the next save, never deleted; ``None``: ignite's names.
        wrap_key: save ``{wrap_key: checkpoint}`` (ignite unwraps a single object; this keeps ``model.pt``'s
            ``{"model": state_dict}``).
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, wrap_key: str | None = None) -> None:
        super().__init__(dirname, require_empty=False)
        self.filename = filename
        self.wrap_key = wrap_key

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        data = {self.wrap_key: checkpoint} if self.wrap_key is not None else checkpoint
        super().__call__(data, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_write(path, lambda tmp: func(plain(checkpoint), tmp, **self.kwargs))

    def remove(self, filename: str) -> None:
        if self.filename is None and idist.get_rank() == self.save_on_rank:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) that writes every file through :py:class:`AtomicDiskSaver`.

    MONAI's saver deletes the best-metric file (``key_metric_filename``) before writing the new one; this one
    replaces it in one step. Its best-metric history is saved by ``state_dict`` (MONAI's only restores it), so that a
    resumed run only replaces ``model.pt`` by a better model.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        wrap_key = next(iter(self.save_dict)) if len(self.save_dict) == 1 else None
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = checkpoint.save_handler.filename
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, fixed, wrap_key)

    def state_dict(self) -> dict:
        """The best-metric history: ``{"_saved": [(score, file name), ...]}``."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {"_saved": []}


def _random_transforms(obj: Any, path: str = "transform", found: dict | None = None, seen: set | None = None) -> dict:
    """The generators (``R``) of the randomizable transforms reachable from ``obj``, keyed by their path."""
    found, seen = ({}, set()) if found is None else (found, seen)
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        children = ((f"[{index}]", item) for index, item in enumerate(obj))
    elif isinstance(obj, Mapping):
        children = ((f".{key}", item) for key, item in obj.items())
    elif isinstance(obj, (Transform, Randomizable)) and not isinstance(obj, type):
        if isinstance(obj, Randomizable):
            found[path] = obj.R
        children = ((f".{key}", item) for key, item in vars(obj).items() if not key.startswith("__"))
    else:
        return found
    for name, item in children:
        _random_transforms(item, path + name, found, seen)
    return found


def _numpy_state(generator: np.random.RandomState) -> dict:
    name, keys, position, has_gauss, cached = generator.get_state(legacy=True)
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def _set_numpy_state(generator: np.random.RandomState, state: Mapping) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    generator.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def random_states(transform: Any = None) -> dict:
    """Python's, NumPy's, torch's and CUDA's generators and those of the randomizable transforms reachable from
    ``transform`` (seeded once, advancing with every sample), as plain data."""
    version, state, gauss = random.getstate()
    return {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": _numpy_state(np.random.mtrand._rand),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "transforms": {path: _numpy_state(r) for path, r in _random_transforms(transform).items()},
    }


def set_random_states(states: Mapping, transform: Any = None) -> None:
    """Restore what :py:func:`random_states` returned (transform generators matched by their path)."""
    python = states["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    _set_numpy_state(np.random.mtrand._rand, states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    current, saved = _random_transforms(transform), states["transforms"]
    if set(saved) != set(current):
        logger.warning(
            "the random transforms differ from the checkpoint's; the resumed run will not repeat the "
            f"interrupted one exactly (missing: {sorted(set(current) - set(saved))[:3]}, "
            f"unknown: {sorted(set(saved) - set(current))[:3]})."
        )
    for path, generator in current.items():
        if path in saved:
            _set_numpy_state(generator, saved[path])


class TrainingCheckpoint:
    """Write a full training checkpoint at the end of every epoch, and resume from it.

    Attach it after the validation handler, so that a checkpoint includes that epoch's validation, early-stopping
    and best-model state. ``checkpoint.pt`` holds ``format``, ``epoch``, ``iteration``, ``stopped_early``,
    ``trainer`` (ignite counters, best metric), each ``save_dict`` entry's state and :py:func:`random_states`.
    With ``resume``, a run continues with the next epoch (one ended by early stopping only with a larger patience);
    the configured ``max_epochs`` wins, so a finished run can be extended. With ``num_workers=0`` the resumed run
    repeats the uninterrupted one exactly. In distributed training rank 0 writes and every rank resumes.

    Args:
        path: the checkpoint file.
        save_dict: named objects with ``state_dict`` / ``load_state_dict``, ignite engines (the validator: its best
            metric) or MONAI's ``EarlyStopHandler``; ``trainer`` and ``random_states`` are reserved names.
        resume: load ``path`` at start if it exists (text is accepted).
        map_location: device for the loaded tensors.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        save_dict: Mapping[str, Any],
        resume: bool | str = False,
        map_location: Any = "cpu",
    ) -> None:
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        if "trainer" in self.save_dict or "random_states" in self.save_dict:
            raise ValueError("save_dict may not use the reserved names 'trainer' and 'random_states'.")
        self.resume = as_bool(resume, "resume")
        self.map_location = map_location

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    @staticmethod
    def _transform(engine) -> Any:
        """The training transform, whose random generators the checkpoint holds."""
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        return getattr(dataset, "transform", dataset)

    @staticmethod
    def state_of(obj: Any) -> Any:
        """The state of one ``save_dict`` entry (or of the trainer)."""
        if isinstance(obj, Engine):
            kept = ("epoch", "best_metric", "best_metric_epoch")  # ignite's own state_dict has no best metric
            return {**obj.state_dict(), **{key: getattr(obj.state, key) for key in kept if hasattr(obj.state, key)}}
        if isinstance(obj, EarlyStopHandler):
            return dict(obj._handler.state_dict()) if obj._handler is not None else {}
        return (obj.module if isinstance(obj, PARALLEL) else obj).state_dict()

    @staticmethod
    def load_into(obj: Any, state: Any, name: str) -> None:
        """Restore one ``save_dict`` entry (of an engine only its best metric: the trainer restores its counters)."""
        if isinstance(obj, Engine):
            for key in ("best_metric", "best_metric_epoch"):
                if key in state:
                    setattr(obj.state, key, state[key])
        elif isinstance(obj, EarlyStopHandler):
            if obj._handler is None:
                raise RuntimeError(f"{name}: call set_trainer on the early-stopping handler before the run starts.")
            if state:
                obj._handler.load_state_dict(state)
        else:
            (obj.module if isinstance(obj, PARALLEL) else obj).load_state_dict(state)

    def save(self, engine) -> None:
        """Write the checkpoint (refusing to replace a good one by weights that are not finite); rank 0 only."""
        for name, obj in self.save_dict.items():
            if isinstance(obj, torch.nn.Module):
                bad = [k for k, v in obj.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
                if bad:
                    raise FloatingPointError(
                        f"epoch {engine.state.epoch}: {name} has non-finite values (e.g. {bad[0]}); kept the "
                        f"previous {self.path}. Lower the learning rate or check the inputs."
                    )
        if idist.get_rank() != 0:  # in distributed training every rank holds the same weights
            return
        content = {
            "format": CHECKPOINT_FORMAT,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "stopped_early": bool(engine.should_terminate),
            "trainer": self.state_of(engine),
            **{name: self.state_of(obj) for name, obj in self.save_dict.items()},
            "random_states": random_states(self._transform(engine)),
        }
        atomic_save(plain(content), self.path)
        logger.info(f"epoch {engine.state.epoch}: saved {self.path}")

    def start(self, engine) -> None:
        """At the trainer's start: clean up after a killed save, then resume if asked to."""
        remove_stale_temporaries(self.path.parent)
        if not self.path.is_file():
            if self.resume:
                logger.warning(f"resume: {self.path} does not exist, starting from scratch.")
            return
        if not self.resume:
            logger.warning(f"{self.path} exists: this run starts from scratch and replaces it after its first epoch "
                           "(pass --resume true to continue the earlier run instead).")  # fmt: skip
            return
        checkpoint = load_checkpoint(self.path, self.map_location)
        if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path}: not a training checkpoint of this bundle (format {CHECKPOINT_FORMAT}).")
        missing = [name for name in self.save_dict if name not in checkpoint]
        if missing:
            raise ValueError(f"{self.path}: the checkpoint lacks {missing}; it was written by another configuration.")
        epoch, max_epochs, epoch_length = int(checkpoint["epoch"]), engine.state.max_epochs, engine.state.epoch_length
        if max_epochs is not None and epoch > max_epochs:
            raise ValueError(f"{self.path}: the checkpoint is at epoch {epoch}, beyond max_epochs {max_epochs}; pass "
                             "a larger --max_epochs to train on.")  # fmt: skip
        for name, obj in self.save_dict.items():
            self.load_into(obj, checkpoint[name], name)
        stored = checkpoint["trainer"]
        if stored.get("epoch_length") != epoch_length:
            logger.warning(
                f"resume: {stored.get('epoch_length')} iterations per epoch in the checkpoint, {epoch_length} now "
                "(the training data changed): the run continues but will not repeat the interrupted one."
            )
        engine.load_state_dict({"epoch": epoch, "epoch_length": epoch_length, "max_epochs": max_epochs})
        self.load_into(engine, stored, "trainer")
        set_random_states(checkpoint["random_states"], self._transform(engine))
        best = checkpoint.get("validator", {}).get("best_metric")
        logger.info(
            f"resumed from {self.path}: {epoch} epochs done, iteration {engine.state.iteration}"
            + (f", best validation score {best:.4f}" if isinstance(best, (int, float)) and best >= 0 else "")
        )
        if checkpoint.get("stopped_early"):
            stoppers = [obj._handler for obj in self.save_dict.values() if isinstance(obj, EarlyStopHandler)]
            ended = not stoppers or any(stopper.counter >= stopper.patience for stopper in stoppers)
            logger.info(f"resume: early stopping had ended this run at epoch {epoch}; " + (
                "nothing left to do (pass a larger --early_stop_patience to train on)." if ended
                else "its patience is larger now, so the run continues."))  # fmt: skip
            if ended:
                engine.terminate()
        elif max_epochs is not None and epoch >= max_epochs:
            logger.info(f"resume: all {max_epochs} epochs are done; pass a larger --max_epochs to train on.")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss:
    """Raise :py:class:`NonFiniteLossError` at the first NaN or infinite loss (ignite's ``TerminateOnNan`` ends the
    run as if it had finished): the command fails and ``checkpoint.pt`` / ``model.pt`` keep the last good epoch.

    Args:
        output_transform: takes ``engine.state.output``, returns the loss.
        checkpoint_dir: folder of ``checkpoint.pt`` / ``model.pt``, named in the message.
    """

    def __init__(self, output_transform: Callable = lambda output: output, checkpoint_dir: str | None = None) -> None:
        self.output_transform = output_transform
        self.checkpoint_dir = checkpoint_dir

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        loss = self.output_transform(engine.state.output)
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        if math.isfinite(value):
            return
        optimizer = getattr(engine, "optimizer", None)
        rate = f" (learning rate {optimizer.param_groups[0]['lr']:.3g})" if optimizer is not None else ""
        folder = self.checkpoint_dir
        kept = f" The last good weights are in {folder} (checkpoint.pt, model.pt)." if folder else ""
        raise NonFiniteLossError(
            f"training stopped: the loss is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
            f"{rate}.{kept} Lower --learning_rate, check the inputs or try --amp False, and train again."
        )
