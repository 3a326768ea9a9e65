"""Combine networks trained alone (``model.pt`` files of one ``network_def``, e.g. seeds) into one ensemble checkpoint.

The result, ``{"model": state_dict}`` of a ``scripts.net.MultiTaskEnsemble``, loads into ``inference.json`` and
``evaluate.json`` as it is: their ``network_def`` takes as many members as the checkpoint holds.

Usage::

    python tools/make_ensemble.py --ckpts "['runs/seed0/models/model.pt','runs/seed1/models/model.pt']" \\
        --out bundle/models/model.pt
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fire
import torch


def combine(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """One ensemble state dict from its members' (``members.<i>.<key>``).

    Raises:
        ValueError: for fewer than two members, or a member whose weights do not match the first one's.
    """
    if len(states) < 2:
        raise ValueError(f"an ensemble needs at least two networks, got {len(states)}.")
    reference = {key: tuple(value.shape) for key, value in states[0].items()}
    for state, name in zip(states[1:], names[1:]):
        if any(key.startswith("members.") for key in state):
            raise ValueError(f"{name} holds an ensemble already; give its members' own model.pt files.")
        if {key: tuple(value.shape) for key, value in state.items()} != reference:
            raise ValueError(f"{name} is not the network of {names[0]} (other weight names or shapes).")
    return {f"members.{index}.{key}": value for index, state in enumerate(states) for key, value in state.items()}


def main(ckpts: list[str], out: str, key: str = "model") -> str:
    """Write the ensemble of ``ckpts`` to ``out`` (replaced only once the new file is complete).

    Args:
        ckpts: checkpoints of the members, in order (the first is the one MONAI Label serves and fine-tunes).
        out: the ensemble checkpoint to write.
        key: the entry holding each checkpoint's weights.
    """
    states = []
    for ckpt in ckpts:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        if key not in checkpoint:
            raise ValueError(f"{ckpt} has no {key!r} entry (keys: {sorted(checkpoint)}).")
        states.append(checkpoint[key])
    ensemble = combine(states, [str(c) for c in ckpts])
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    os.close(handle)
    try:
        torch.save({key: ensemble}, partial)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return f"{target}: {len(states)} members"


if __name__ == "__main__":
    fire.Fire(main)
