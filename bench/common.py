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
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))


def machine() -> dict:
    """CPU (with its vector capability and whether it computes bf16 natively, which decides the bundle's default
    precision), core count, software versions and the load average now."""
    import monai
    import torch

    from scripts.inferers import native_bf16

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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cpu"),
        "machine_kind": machine_kind(native_bf16("cpu")),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "load": load(),
    }


def machine_kind(bf16: bool) -> str:
    """The name of a machine's table in the benchmarks page: CPUs with and without native bf16 differ ~10x."""
    return "CPU with native bf16" if bf16 else "CPU without native bf16"


def results_dir() -> Path:
    """``bench/results/<machine kind>``: each kind of machine keeps its own results (and its own table)."""
    from scripts.inferers import native_bf16

    return BENCH_DIR / "results" / machine_kind(native_bf16("cpu")).lower().replace(" ", "-")


def load() -> list[float]:
    """1, 5 and 15 minute load averages (``uptime``)."""
    return [round(x, 2) for x in os.getloadavg()]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as stream:
                found += [int(x) for x in stream.read().split()]
    except OSError:
        pass
    return found


def _tree(pid: int) -> list[int]:
    pending, tree = [pid], []
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(_children(current))
    return tree


def tree_memory_mb(pid: int, pss: bool = True) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) in MiB of ``pid`` and all its descendants (PSS 0 when ``pss`` is False).

    RSS counts pages shared between the processes (the forked data-loader workers share the dataset cache with
    the main process) once per process; PSS splits shared pages between them, so its sum is the real footprint.
    """
    rss, total_pss = 0.0, 0.0
    for current in _tree(pid):
        try:
            with open(f"/proc/{current}/statm") as stream:
                rss += int(stream.read().split()[1]) * PAGE_KB / 1024
            if pss:
                with open(f"/proc/{current}/smaps_rollup") as stream:
                    for line in stream:
                        if line.startswith("Pss:"):
                            total_pss += int(line.split()[1]) / 1024
                            break
        except (OSError, IndexError, ValueError):
            continue
    return rss, total_pss


def busy_cpu_s() -> float:
    """CPU seconds spent by all processes of the machine since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as stream:
        fields = [int(x) for x in stream.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants."""
    total = 0.0
    for current in _tree(pid):
        try:
            with open(f"/proc/{current}/stat") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


def wait_for_idle(threshold: float = 0.6, max_wait_s: float = 600) -> float:
    """Wait until the 1-minute load average falls below ``threshold`` (at most ``max_wait_s``); seconds waited."""
    start = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - start < max_wait_s:
        time.sleep(5)
    return time.perf_counter() - start


def run_measured(command: list[str], log: Path, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a child process, sampling the memory of its process tree (RSS every 0.5 s, PSS every 2 s).

    Returns:
        ``{"rc", "wall_s", "peak_rss_mb"`` (the main process, from ``wait4``), ``"peak_tree_rss_mb"``,
        ``"peak_tree_pss_mb"`` (all processes of the tree summed), ``"load_before"``, ``"load_after"``,
        ``"other_cores"``: CPU time used by processes outside the measured tree and this one, per second of the run
        (0: the machine was otherwise idle; 1: another process kept one core busy)``}``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    before = load()
    busy_before, own_before = busy_cpu_s(), time.process_time()
    start = time.perf_counter()
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=stream, stderr=subprocess.STDOUT)
        peaks = {"rss": 0.0, "pss": 0.0}
        done = threading.Event()

        def sample() -> None:
            count = 0
            while not done.is_set():
                rss, pss = tree_memory_mb(process.pid, pss=count % 4 == 0)
                peaks["rss"], peaks["pss"] = max(peaks["rss"], rss), max(peaks["pss"], pss)
                count += 1
                done.wait(0.5)

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
            time.sleep(0.1)
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    child_cpu = usage.ru_utime + usage.ru_stime if usage else 0.0  # includes the workers it reaped
    other = busy_cpu_s() - busy_before - child_cpu - (time.process_time() - own_before)
    return {
        "rc": process.returncode,
        "wall_s": wall,
        "cpu_s": child_cpu,
        "other_cores": max(0.0, other / wall),
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
