"""Load on the MONAI Label server: sequential and concurrent inference requests on loopback, latency and memory.

Run with the MONAI Label environment's Python (``bash monailabel/setup_env.sh`` creates it)::

    .venv-monailabel/bin/python bench/monailabel_load.py --out runs/bench/monailabel_load.json

Unless ``--url`` names a running server, it starts one with the documented command (``monailabel/start.sh``) on
127.0.0.1 and a free port, on generated studies (synthetic B-mode images at BUSI-like sizes, PNG and single-slice
NRRD; no real data), and stops it at the end. Requests go through MONAI Label's own Python client, the one 3D
Slicer's module uses, and only to the loopback address. Phases:

1. warm-up (``--warmup`` requests), then the server's memory is the baseline;
2. ``--sequential`` requests one after the other;
3. ``--threads`` clients at once, ``--per-thread`` requests each.

Reported per phase: errors, median / p95 / max latency, requests per second, and the server's memory (RSS and
PSS of its process tree) after the phase; the run passes when no request failed and the memory grew by at most
``--max-growth`` (10 %) over the baseline. The weights do not matter for speed (a freshly initialised network
when ``bundle/models/model.pt`` is missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO_ROOT, load, tree_memory_mb, write_json


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


monailabel_server = load_module(REPO_ROOT / "monailabel" / "server.py")  # start.sh on a free loopback port

MODEL = "breast_ultrasound_segmentation_classification"
SIZES = [(470, 560), (520, 610), (440, 580), (500, 500), (560, 640), (450, 600)]  # (height, width), BUSI-like


def write_studies(folder: Path, seed: int = 0) -> list[str]:
    """Synthetic images (PNG and single-slice NRRD) at BUSI-like sizes; returns their image ids."""
    import itk
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from synthetic import CLASSES, make_case

    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for index, (height, width) in enumerate(SIZES + SIZES[:2]):
        label = CLASSES[index % len(CLASSES)]
        image, _ = make_case(np.random.default_rng([seed, index]), label, height, width)
        image_id = f"case_{index:02d}"
        if index < len(SIZES):
            Image.fromarray(image).save(folder / f"{image_id}.png")
        else:  # as 3D Slicer saves a 2D image: one slice with spacing and origin
            volume = itk.image_from_array(np.ascontiguousarray(image[None].astype(np.int16)))
            volume.SetSpacing((0.1, 0.1, 1.0))
            volume.SetOrigin((-20.0, 15.0, 0.0))
            itk.imwrite(volume, str(folder / f"{image_id}.nrrd"), compression=True)
        ids.append(image_id)
    return ids


def server_pid(url: str, started: subprocess.Popen | None) -> int | None:
    """The server process: the one started here, or the one listening on the URL's port (``--url``)."""
    if started is not None:
        return started.pid
    port = url.rsplit(":", 1)[-1].strip("/")
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
        return int(out.split("pid=", 1)[1].split(",", 1)[0])
    except (OSError, IndexError, ValueError):
        return None


def memory(pid: int | None) -> dict:
    if pid is None:
        return {}
    rss, pss = tree_memory_mb(pid)
    return {"rss_mb": round(rss, 1), "pss_mb": round(pss, 1)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def run_requests(url: str, ids: list[str], count: int, offset: int, tmpdir: str) -> tuple[list, list, list]:
    """``count`` inference requests; returns client latencies, server-side latencies (its JSON) and errors."""
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(url, tmpdir=tmpdir)
    latencies, server_side, errors = [], [], []
    for i in range(count):
        image_id = ids[(offset + i) % len(ids)]
        start = time.perf_counter()
        try:
            path, params = client.infer(MODEL, image_id, {})
            if not path or "class" not in params:
                raise ValueError(f"incomplete result for {image_id}: {path}, {sorted(params)}")
            os.unlink(path)
        except Exception as error:  # every failure is counted and reported
            errors.append(f"{image_id}: {type(error).__name__}: {error}"[:300])
            continue
        latencies.append(time.perf_counter() - start)
        server_side.append(params.get("latencies", {}))
    return latencies, server_side, errors


def summary(latencies: list[float], server_side: list[dict], errors: list[str], seconds: float, requests: int) -> dict:
    def server_median(key: str) -> float | None:
        values = [s[key] for s in server_side if isinstance(s.get(key), (int, float))]
        return round(1000 * statistics.median(values), 1) if values else None

    return {
        "requests": requests,
        "errors": len(errors),
        "error_examples": errors[:3],
        "median_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(1000 * percentile(latencies, 95), 1) if latencies else None,
        "max_ms": round(1000 * max(latencies), 1) if latencies else None,
        "wall_s": round(seconds, 2),
        "requests_per_s": round(requests / seconds, 2) if seconds else None,
        "server_median_ms": {key: server_median(key) for key in ("total", "pre", "infer", "post", "write")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--url", default=None, help="a running server (default: start one on generated studies)")
    ap.add_argument("--ids", nargs="*", default=None, help="image ids to request (with --url)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--per-thread", type=int, default=50)
    ap.add_argument("--max-growth", type=float, default=0.10)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="monailabel_load_"))
    server = None
    try:
        if args.url:
            url, ids = args.url.rstrip("/"), args.ids
        else:
            ids = write_studies(work / "studies")
            # no uncertainty scoring of the studies at start-up: it would run beside the measured requests
            server, url = monailabel_server.start(
                work / "studies", work, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
            )
        from monailabel.client import MONAILabelClient

        ids = ids or sorted(MONAILabelClient(url).datastore()["objects"])
        pid = server_pid(url, server)
        result: dict = {"url": url, "images": len(ids), "cores": os.cpu_count(), "load_before": load()}

        # the client's own result folder: the server (TMPDIR=work) deletes its temporary result files after sending
        # them, and the client saves each result under the server's file name, so in a shared folder the server's
        # clean-up could delete the client's copy before the client reads it
        client_folder = work / "client_sequential"
        client_folder.mkdir(exist_ok=True)
        run_requests(url, ids, args.warmup, 0, str(client_folder))
        result["memory_after_warmup"] = memory(pid)

        start = time.perf_counter()
        latencies, server_side, errors = run_requests(url, ids, args.sequential, 0, str(client_folder))
        result["sequential"] = summary(latencies, server_side, errors, time.perf_counter() - start, args.sequential)
        result["memory_after_sequential"] = memory(pid)

        outcomes: list[tuple[list, list, list]] = [([], [], [])] * args.threads

        def worker(k: int) -> None:
            # one result folder per client, as with separate Slicer users: the client saves each result under the
            # file name the server sends, so clients sharing a folder can overwrite and delete each other's files
            folder = work / f"client_{k}"
            folder.mkdir(exist_ok=True)
            outcomes[k] = run_requests(url, ids, args.per_thread, k * 7, str(folder))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.threads)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        all_latencies = [x for lat, _, _ in outcomes for x in lat]
        all_server = [x for _, srv, _ in outcomes for x in srv]
        all_errors = [x for _, _, err in outcomes for x in err]
        result["concurrent"] = summary(all_latencies, all_server, all_errors, seconds, args.threads * args.per_thread)
        result["concurrent"]["threads"] = args.threads
        result["memory_after_concurrent"] = memory(pid)
        result["load_after"] = load()

        base = result["memory_after_warmup"].get("pss_mb")
        final = [result[k].get("pss_mb") for k in ("memory_after_sequential", "memory_after_concurrent")]
        growth = (max(final) - base) / base if base and all(final) else None
        result["memory_growth"] = round(growth, 4) if growth is not None else None
        result["passed"] = (
            result["sequential"]["errors"] == 0
            and result["concurrent"]["errors"] == 0
            and growth is not None
            and growth <= args.max_growth
        )
        write_json(Path(args.out), result)
        print(json.dumps(result, indent=1))
    finally:
        if server is not None:
            monailabel_server.stop(server)
    sys.exit(0 if result.get("passed") else 1)


if __name__ == "__main__":
    main()
