"""The pinned environments: write a lock file from ``pip freeze`` and copy its versions into ``metadata.json``.

The locks are pip constraint files: ``requirements-lock.txt`` for the bundle's core environment (``tools/env.sh``)
and ``monailabel/requirements-lock.txt`` for the MONAI Label server (``monailabel/setup_env.sh``). Refresh both on
purpose with ``bash tools/refresh_pins.sh``; these subcommands are its steps::

    python tools/pins.py lock FREEZE_FILE LOCK_FILE --title "..."   # a lock file from `pip freeze` output
    python tools/pins.py metadata                                   # metadata.json's versions from the core lock
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
CORE_LOCK = ROOT / "requirements-lock.txt"
METADATA = ROOT / "bundle" / "configs" / "metadata.json"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
LOCK_HEADER = """# {title}
# Written by `bash tools/refresh_pins.sh` (tools/pins.py) from `pip freeze` of a fresh environment: do not edit by
# hand. Used as pip constraints, so only what the requirements ask for is installed, at exactly these versions.
"""


def normalise(name: str) -> str:
    """PEP 503 form of a distribution name (``PyYAML`` -> ``pyyaml``, ``pytorch_ignite`` -> ``pytorch-ignite``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path = CORE_LOCK) -> dict[str, str]:
    """The ``name==version`` pins of a lock file.

    Args:
        path: a lock (or requirements/constraints) file; comments, blank lines and other requirement forms are
            skipped.

    Returns:
        ``{normalised name: version}``.
    """
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def lock(freeze_file: str, lock_file: str, title: str = "Pinned environment") -> None:
    """Write a lock file from ``pip freeze`` output.

    Editable and direct-reference lines (the project itself) are left out, and local version labels are dropped
    (``torch==2.13.0+cpu`` -> ``torch==2.13.0``, which pip matches to the local CPU build and the registry's alike).

    Args:
        freeze_file: ``pip freeze`` output.
        lock_file: the lock file to write.
        title: first comment line of the lock file.
    """
    lines = []
    for line in Path(freeze_file).read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            lines.append(f"{match.group(1)}=={match.group(2).split('+')[0]}")
    if not lines:
        raise SystemExit(f"{freeze_file}: no name==version lines")
    lines.sort(key=str.lower)
    Path(lock_file).write_text(LOCK_HEADER.format(title=title) + "\n".join(lines) + "\n")
    print(f"{lock_file}: {len(lines)} pins")


def metadata_versions(pins: dict[str, str], metadata: dict) -> dict:
    """``metadata`` with its package versions taken from ``pins``.

    Args:
        pins: ``{normalised name: version}`` of the core lock.
        metadata: the parsed ``metadata.json``.

    Returns:
        A copy with ``monai_version``, ``pytorch_version``, ``numpy_version`` and every
        ``required_packages_version`` entry set from the pins.

    Raises:
        KeyError: a package that the metadata lists is not pinned.
    """
    updated = dict(metadata)
    updated["monai_version"] = pins["monai"]
    updated["pytorch_version"] = pins["torch"]
    updated["numpy_version"] = pins["numpy"]
    updated["required_packages_version"] = {
        name: pins[normalise(name)] for name in metadata["required_packages_version"]
    }
    return updated


def metadata(lock_file: str = str(CORE_LOCK), metadata_file: str = str(METADATA)) -> None:
    """Copy the core lock's versions into ``metadata.json`` (key order and everything else unchanged).

    Args:
        lock_file: the core lock.
        metadata_file: the bundle's ``metadata.json``.
    """
    with open(metadata_file) as stream:
        current = json.load(stream)
    updated = metadata_versions(read_lock(lock_file), current)
    if updated != current:
        Path(metadata_file).write_text(json.dumps(updated, indent=4) + "\n")
    print(f"{metadata_file}: {'updated' if updated != current else 'already agrees'}")


if __name__ == "__main__":
    fire.Fire({"lock": lock, "metadata": metadata})
