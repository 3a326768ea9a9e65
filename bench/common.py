"""Shared helpers of the benchmarks: machine load, process-tree memory, child processes, timing statistics."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
BENCH_DIR = REPO_ROOT / "bench"
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def machine() -> dict:
    """CPU, core count, software versions and the load average now."""
    import monai
    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "load": load(),
    }


def load() -> list[float]:
    """1, 5 and 15 minute load averages (``uptime``)."""
    return [round(x, 2) for x in os.getloadavg()]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
            tree.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return tree


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) in MiB of ``pid`` and all its descendants.

    RSS counts pages shared between the processes (the forked data-loader workers share the dataset cache with
    the main process) once per process; PSS splits shared pages between them, so its sum is the real footprint.
    """
    tree, pending, rss, pss = _children(), [pid], 0.0, 0.0
    while pending:
        current = pending.pop()
        pending.extend(tree.get(current, []))
        try:
            with open(f"/proc/{current}/smaps_rollup") as stream:
                for line in stream:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) / 1024
        except OSError:
            continue
    return rss, pss


def run_measured(command: list[str], log: Path, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a child process, sampling the memory of its process tree every 0.2 s.

    Returns:
        ``{"rc", "wall_s", "peak_rss_mb"`` (the main process, from ``wait4``), ``"peak_tree_rss_mb"``,
        ``"peak_tree_pss_mb"`` (all processes of the tree summed), ``"load_before"``, ``"load_after"}``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    before = load()
    start = time.perf_counter()
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=stream, stderr=subprocess.STDOUT)
        peaks = {"rss": 0.0, "pss": 0.0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, pss = tree_memory_mb(process.pid)
                peaks["rss"], peaks["pss"] = max(peaks["rss"], rss), max(peaks["pss"], pss)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = start + timeout
        status, usage = 0, None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    return {
        "rc": process.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": usage.ru_maxrss / 1024 if usage else float("nan"),
        "peak_tree_rss_mb": peaks["rss"],
        "peak_tree_pss_mb": peaks["pss"],
        "load_before": before,
        "load_after": load(),
    }


def python_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH_DIR / script), *args]


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1, sort_keys=False) + "\n")
