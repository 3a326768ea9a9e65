"""Combine networks trained alone (``model.pt`` files of one ``network_def``, e.g. seeds) into one ensemble checkpoint.

The result, ``{"model": state_dict}`` of a ``scripts.net.MultiTaskEnsemble``, loads into ``inference.json`` and
``evaluate.json`` as it is: their ``network_def`` takes as many members as the checkpoint holds.

Usage::

    python tools/make_ensemble.py --ckpts "['runs/seed0/models/model.pt','runs/seed1/models/model.pt']" \\
        --out bundle/models/model.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.handlers import atomic_save, load_checkpoint  # noqa: E402
from scripts.net import ENSEMBLE_PREFIX  # noqa: E402


def combine(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """One ensemble state dict from its members' (``members.<i>.<key>``).

    Raises:
        ValueError: for fewer than two members, or a member whose weights do not match the first one's.
    """
    if len(states) < 2:
        raise ValueError(f"an ensemble needs at least two networks, got {len(states)}.")
    reference = {key: tuple(value.shape) for key, value in states[0].items()}
    for state, name in zip(states, names):
        if any(key.startswith(ENSEMBLE_PREFIX) for key in state):
            raise ValueError(f"{name} holds an ensemble already; give its members' own model.pt files.")
        if {key: tuple(value.shape) for key, value in state.items()} != reference:
            raise ValueError(f"{name} is not the network of {names[0]} (other weight names or shapes).")
    return {f"{ENSEMBLE_PREFIX}{i}.{key}": value for i, state in enumerate(states) for key, value in state.items()}


def main(ckpts: list[str], out: str, key: str = "model") -> str:
    """Write the ensemble of ``ckpts`` to ``out`` (replaced only once the new file is complete).

    Args:
        ckpts: checkpoints of the members, in order (the first is the one MONAI Label serves and fine-tunes).
        out: the ensemble checkpoint to write.
        key: the entry holding each checkpoint's weights.
    """
    states = []
    for ckpt in ckpts:
        checkpoint = load_checkpoint(ckpt)
        if key not in checkpoint:
            raise ValueError(f"{ckpt} has no {key!r} entry (keys: {sorted(checkpoint)}).")
        states.append(checkpoint[key])
    ensemble = combine(states, [str(c) for c in ckpts])
    return f"{atomic_save({key: ensemble}, out)}: {len(states)} members"


if __name__ == "__main__":
    fire.Fire(main)
