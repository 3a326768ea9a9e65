"""Drive a running MONAI Label server the way 3D Slicer's MONAI Label module does, with the same Python client.

Run with the MONAI Label environment's Python; used by ``tests/test_monailabel.py``::

    .venv-monailabel/bin/python monailabel/e2e_client.py PLAN.json REPORT.json

The plan (JSON) names the server, the model and the steps; every step's outcome goes into the report (JSON), and
result label files are kept in the plan's ``out_dir``. Steps, in order:

1. ``info`` and ``datastore`` (what the module shows after *Connect*);
2. ``upload``: images sent by the viewer (``upload_image``, as *Upload volume* does with a volume saved by Slicer);
3. ``infer_before``: auto-segmentation of each image id (``infer``, as the *Auto Segmentation* button does);
   ``infer_slicer``: the same with the parameters the Slicer module adds to every request (``SLICER_INFER_PARAMS``:
   an 8-bit NRRD label file whatever the image format);
4. ``active_learning``: the scoring method run with the step's ``params`` (``POST /scoring/<name>``; the client
   has no call for it, so the client's own HTTP helper sends it) until it ends, the image infos it stored
   (``datastore``), then the strategy asked for the next sample (``next_sample``, as *Next Sample* does), a label
   saved for that image, and the strategy asked again;
5. ``labels``: corrected label maps saved (``save_label``, as *Submit Label* does);
6. ``train``: a training run with the trainer's own option values, as the *Train* button sends them, except the
   ones the plan overrides; the client polls ``train_status`` until it ends (``train_timeout`` seconds);
7. ``infer_after``: the same inference again, which must use the new weights.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelUtils

# what MONAILabelLogic.infer of the Slicer module (MONAILabel.py) sets on every inference request
SLICER_INFER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def slicer_params(config: dict, overrides: dict) -> dict:
    """Option values as the Slicer module sends them: the first entry of a list of choices, the value otherwise."""
    params = {key: value[0] if isinstance(value, list) and value else value for key, value in config.items()}
    params.update(overrides)
    return params


def infer_all(
    client: MONAILabelClient, model: str, image_ids: list[str], out_dir: Path, tag: str, params: dict | None = None
) -> dict:
    """Infer each image id with the request ``params``; keep the label files in ``out_dir`` as ``<tag>_<id>.<ext>``."""
    results = {}
    for image_id in image_ids:
        start = time.perf_counter()
        path, params_out = client.infer(model, image_id, dict(params or {}))
        seconds = time.perf_counter() - start
        kept = None
        if path:
            kept = out_dir / f"{tag}_{image_id}{''.join(Path(path).suffixes)}"
            shutil.move(path, kept)
        results[image_id] = {"file": str(kept) if kept else None, "json": params_out, "seconds": round(seconds, 3)}
    return results


def http_json(url: str, method: str, selector: str, body: dict | None = None) -> tuple[int, object]:
    """One request with the client's own HTTP helper: the status and the decoded JSON answer."""
    status, response, _, _ = MONAILabelUtils.http_method(method, url, selector, body)
    return status, json.loads(response) if response else None


def run_scoring(url: str, method: str, params: dict, timeout: float) -> dict:
    """Run scoring ``method`` with the request ``params`` and wait for it to end; return its task (status, details).

    MONAI Label itself starts all scoring methods once the app is ready and after each next-sample request, and
    answers 429 to a second run while one is going: ask again until it takes ours. The end is read from the task's
    own status (``GET /scoring/?all=true``): "no scoring running" is also what MONAI Label says just before a
    submitted task starts its process and just after it ends, before the task is marked done.
    """
    deadline = time.monotonic() + timeout
    while True:
        status, task = http_json(url, "POST", f"/scoring/{method}", params)
        if status == 200:
            break
        if status != 429 or time.monotonic() > deadline:
            raise RuntimeError(f"POST /scoring/{method}: status {status}: {task}")
        time.sleep(1)
    while task["status"] in ("SUBMITTED", "RUNNING"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"scoring task still {task['status']} after {timeout:.0f} s: {task}")
        time.sleep(1)
        _, tasks = http_json(url, "GET", "/scoring/?all=true")
        (task,) = [entry for entry in tasks if entry["id"] == task["id"]]
    task["details"] = list(task.get("details") or [])
    return task


def scoring_summary(details: list[str]) -> dict:
    """The scoring method's result: the JSON line the scoring process prints last."""
    for line in reversed(details):
        try:
            summary = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if isinstance(summary, dict) and "method" in summary:
            return summary
    return {}


def active_learning(client: MONAILabelClient, url: str, step: dict, labels: list[dict]) -> dict:
    """Score, take the next sample, label it, take the next one (see the module docstring)."""
    scoring = run_scoring(url, step["scoring"], step.get("params", {}), float(step.get("timeout", 600)))
    objects = client.datastore().get("objects", {})
    first = client.next_sample(step["strategy"], {})
    label = {item["id"]: item for item in labels}[first["id"]]
    saved = client.save_label(first["id"], label["file"], params={"label_info": label.get("label_info", [])})
    second = client.next_sample(step["strategy"], {})
    return {
        "scoring": scoring,
        "summary": scoring_summary(scoring["details"]),
        "datastore": {image_id: obj.get("image", {}).get("info", {}) for image_id, obj in objects.items()},
        "samples": [first, second],
        "label": saved,
    }


def run(plan: dict) -> dict:
    out_dir = Path(plan["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MONAILabelClient(plan["url"], tmpdir=tempfile.mkdtemp(dir=out_dir))
    model = plan["model"]
    report: dict = {"info": client.info()}
    report["datastore_ids"] = sorted(client.datastore().get("objects", {}))
    report["upload"] = [client.upload_image(item["file"], item["id"]) for item in plan.get("upload", [])]
    report["infer_before"] = infer_all(client, model, plan["infer_before"], out_dir, "before")
    report["infer_slicer"] = infer_all(
        client, model, plan.get("infer_slicer", []), out_dir, "slicer", params=SLICER_INFER_PARAMS
    )
    if "active_learning" in plan:
        report["active_learning"] = active_learning(client, plan["url"], plan["active_learning"], plan["labels"])
    report["labels"] = [
        client.save_label(item["id"], item["file"], params={"label_info": item.get("label_info", [])})
        for item in plan.get("labels", [])
    ]
    if "train" in plan:
        trainer = report["info"].get("trainers", {}).get(model, {})
        params = slicer_params(trainer.get("config", {}), plan["train"])
        report["train_params"] = params
        report["train_start"] = client.train_start(model, params)
        deadline = time.monotonic() + float(plan.get("train_timeout", 900))
        status = client.train_status()
        while status.get("status") in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2)
            status = client.train_status()
        if status.get("status") in ("SUBMITTED", "RUNNING"):
            client.train_stop()
            status["timed_out"] = True
        status["details"] = list(status.get("details") or [])
        report["train_status"] = status
        report["infer_after"] = infer_all(client, model, plan.get("infer_after", []), out_dir, "after")
    return report


def main() -> None:
    plan_path, report_path = sys.argv[1:3]
    report = run(json.loads(Path(plan_path).read_text()))
    Path(report_path).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
