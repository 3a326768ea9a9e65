"""Run every benchmark of the bundle on this machine, then write the results table to bundle/docs/benchmarks.md.

One command::

    python bench/run_all.py --dataset_dir /path/to/Dataset_BUSI_with_GT

Each measurement runs in its own process (its peak memory is that of its process tree); results go to
``bench/results/<machine kind>/*.json`` (CPUs with and without native bf16 are kept apart) and logs to
``bench/results/<machine kind>/logs``. ``--only`` picks parts (``preprocess predict
inference train``), ``--quick`` shortens everything (a smoke run, not for the table). ``bench/report.py``
re-renders the table from the JSON files.

Nothing derived from the dataset's pixels is written: the prediction benchmarks use generated images
(``tools/synthetic.py``) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BUNDLE_ROOT,
    load,
    machine,
    median,
    python_command,
    results_dir,
    run_measured,
    wait_for_idle,
    write_json,
)

RESULTS = results_dir()
PARTS = ("preprocess", "predict", "inference", "train", "precision")

# (name, description, mode, epochs, overrides); the first epoch of each run is not counted in the medians
NICE_WORKERS = "$lambda worker_id: (os.nice(10), monai.data.utils.worker_init_fn(worker_id))"
SPEED_OFF = {"amp": False, "channels_last": False, "cache_rate": 0,
             "network_def#act": "prelu", "network_def#dropout": 0.1}  # fmt: skip
TRAIN_RUNS = [
    ("default", "train.json as shipped (amp \"auto\": bf16 autocast only where the CPU computes it natively and a "
     "timed training step finds it faster; channels-last, cache, LeakyReLU, no conv dropout)",
     "bundle", 5, {}),
    ("fp32", "default with --amp False (float32)", "bundle", 5, {"amp": False}),
    ("bf16", "default with --amp True (bf16 autocast forced)", "bundle", 2, {"amp": True}),
    ("default_seed1", "default, seed 1 (run-to-run spread of the validation metrics)", "bundle", 5, {"seed": 1}),
    ("fp32_seed1", "float32, seed 1 (run-to-run spread of the validation metrics)", "bundle", 5,
     {"amp": False, "seed": 1}),
    ("no_channels_last", "default with --channels_last False", "bundle", 2, {"channels_last": False}),
    ("no_cache", "default with --cache_rate 0", "bundle", 2, {"cache_rate": 0}),
    ("prelu_dropout", "default with the old network (PReLU, dropout 0.1)", "bundle", 2,
     {"network_def#act": "prelu", "network_def#dropout": 0.1}),
    ("speed_switches_off", "all of the above off: float32, no channels-last, no cache, PReLU + dropout 0.1",
     "bundle", 2, SPEED_OFF),
    ("no_meta", "default, but MONAI metadata tracking off after caching (set_track_meta(False))", "bundle", 2,
     {}),
    ("nice_workers", "default, data-loader workers at nice 10 (the network step gets the cores first)", "bundle", 2,
     {"train#dataloader#worker_init_fn": NICE_WORKERS}),
    ("tuned", "default + workers at nice 10 + metadata tracking off after caching", "bundle", 2,
     {"train#dataloader#worker_init_fn": NICE_WORKERS}),
    ("lite1", "default with the deeper pretrained encoder (--network_def#encoder efficientnet-lite1)", "bundle", 3,
     {"network_def#encoder": "efficientnet-lite1"}),
    ("lite2", "default with the deeper and wider pretrained encoder (--network_def#encoder efficientnet-lite2)",
     "bundle", 3, {"network_def#encoder": "efficientnet-lite2"}),
    ("two_model_unet", "MONAI UNet (DiceCE), float32, same data loader", "unet", 2, {}),
    ("two_model_densenet", "MONAI DenseNet121 (cross-entropy), float32, same data loader", "densenet", 2, {}),
]  # fmt: skip
# forced bf16 is ~10x slower where the CPU emulates it: 6 iterations an epoch give its speed
EXTRA_ARGS = {"no_meta": ["--no_meta_after_cache"], "tuned": ["--no_meta_after_cache"], "bf16": ["--epoch_length", "6"]}


IDLE = {"threshold": 0.6, "max_wait_s": 600.0}


def measure(command: list[str], log: Path) -> dict:
    """``run_measured`` once the machine is idle (1-minute load below ``IDLE["threshold"]``, or after a wait)."""
    waited = wait_for_idle(IDLE["threshold"], IDLE["max_wait_s"]) if IDLE["max_wait_s"] > 0 else 0.0
    return {**run_measured(command, log), "waited_for_idle_s": waited}


def synthetic_folder(root: Path, count: int) -> Path:
    """``count`` generated images of BUSI-like size (about 450-600 x 500-780 pixels), without masks."""
    sys.path.insert(0, str(BUNDLE_ROOT.parent / "tools"))
    import synthetic

    synthetic.HEIGHT_RANGE, synthetic.WIDTH_RANGE = (450, 600), (500, 780)
    per_class = -(-count // 3)
    synthetic.generate_dataset(str(root / "generated"), num_per_class=per_class, seed=1)
    images = root / "images"
    images.mkdir()
    files = sorted(p for p in (root / "generated").rglob("*).png"))[:count]
    for path in files:
        shutil.copy(path, images / path.name)
    return images


def random_checkpoint(path: Path) -> Path:
    """A ``model.pt`` of the inference configuration's network with its initial weights."""
    import torch
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, path)
    return path


def engine_seconds(log: Path) -> float:
    """The evaluator's own run time from its log line ``Engine run finished. Time taken: HH:MM:SS.mmm``."""
    found = re.findall(r"Engine run finished\. Time taken: (\d+):(\d+):(\d+\.\d+)", log.read_text(errors="replace"))
    if not found:
        return float("nan")
    h, m, s = found[-1]
    return 3600 * int(h) + 60 * int(m) + float(s)


def run_inference(folder: Path, checkpoint: Path, work: Path, repeats: int) -> dict:
    """End-to-end ``inference.json`` runs: a folder of images, and a single image, a few times each."""
    variants = {
        "folder_default": (folder, []),
        "folder_batch16_workers2": (folder, ["--batch_size", "16", "--num_workers", "2"]),
        "folder_fp32": (folder, ["--amp", "False", "--channels_last", "False"]),
        "folder_onnxruntime": (folder, ["--backend", "onnxruntime"]),
        "folder_explanation_maps": (folder, ["--explanation_maps", "true"]),
        "single_image": (sorted(folder.iterdir())[0], []),
    }
    results = {}
    for name, (source, extra) in variants.items():
        runs = []
        for repeat in range(repeats):
            out = work / f"{name}_{repeat}"
            log = RESULTS / "logs" / f"inference_{name}_{repeat}.log"
            command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.json",
                       "--dataset_dir", str(source), "--output_dir", str(out), "--ckpt_path", str(checkpoint),
                       *extra]  # fmt: skip
            measured = measure(command, log)
            if measured["rc"] != 0:
                raise RuntimeError(f"inference {name} failed, see {log}")
            with open(out / "predictions.csv") as stream:
                measured["images"] = sum(1 for _ in stream) - 1
            measured["engine_s"] = engine_seconds(log)
            runs.append(measured)
            print(f"inference {name} #{repeat}: {measured['wall_s']:.1f} s wall, {measured['engine_s']:.1f} s engine",
                  flush=True)  # fmt: skip
        results[name] = {
            "images": runs[0]["images"],
            "wall_s": median([r["wall_s"] for r in runs]),
            "engine_s": median([r["engine_s"] for r in runs]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_tree_pss_mb": max(r["peak_tree_pss_mb"] for r in runs),
            "runs": runs,
            "args": extra,
        }
    return results


def run_precision(dataset_dir: str, datalist: list[str], work: Path) -> dict:
    """The shipped weights evaluated with bf16 autocast and with float32, on the validation and test splits."""
    checkpoint = BUNDLE_ROOT / "models" / "model.pt"
    if not checkpoint.is_file():
        print(f"precision: {checkpoint} missing, skipped")
        return {}
    results = {}
    for split in ("validation", "test"):
        for name, amp in (("bf16", "True"), ("fp32", "False")):
            out = work / f"precision_{split}_{name}"
            command = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
                       "['bundle/configs/train.json','bundle/configs/evaluate.json']", "--dataset_dir", dataset_dir,
                       *datalist, "--ckpt_dir", str(checkpoint.parent), "--output_dir", str(out),
                       "--validate#split", split, "--amp", amp, "--channels_last", amp]  # fmt: skip
            measured = measure(command, RESULTS / "logs" / f"precision_{split}_{name}.log")
            if measured["rc"] != 0:
                raise RuntimeError(f"evaluation {split} {name} failed, see bench/results/logs")
            metrics = json.loads((out / "metrics.json").read_text())
            results[f"{split}_{name}"] = {
                "lesion_dice": metrics["segmentation"]["lesion_dice"],
                "accuracy": metrics["classification"]["accuracy"],
                "macro_f1": metrics["classification"]["macro_f1"],
                "num_images": metrics["num_images"],
                "process": measured,
            }
            print(f"precision {split} {name}: {results[f'{split}_{name}']}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True, help="the BUSI folder (read only)")
    ap.add_argument("--datalist", default=None, help="default: the committed bundle/configs/datalist_<folder>.json")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--runs", nargs="+", default=None, help="training runs to do (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1-2 epochs, few repeats")
    ap.add_argument("--no_report", action="store_true", help="don't rewrite bundle/docs/benchmarks.md")
    ap.add_argument("--idle_load", type=float, default=0.6, help="wait for a 1-minute load average below this")
    ap.add_argument("--max_wait", type=float, default=600, help="longest wait for it before each measurement (s)")
    args = ap.parse_args()
    IDLE.update(threshold=args.idle_load, max_wait_s=args.max_wait)

    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    info = {"started": started, "machine": machine(), "dataset_dir": args.dataset_dir, "quick": args.quick}
    datalist = ["--datalist", args.datalist] if args.datalist else []
    print(f"machine: {info['machine']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        work = Path(tmp)
        if "predict" in args.only or "inference" in args.only or "preprocess" in args.only:
            folder = synthetic_folder(work, 10 if args.quick else 100)
        if "preprocess" in args.only:
            out = RESULTS / "preprocess.json"
            command = python_command("preprocess_bench.py", "--dataset_dir", args.dataset_dir, *datalist,
                                     "--num_images", "10" if args.quick else "60", "--image_folder", str(folder),
                                     "--out", str(out))  # fmt: skip
            measured = measure(command, RESULTS / "logs" / "preprocess.log")
            assert measured["rc"] == 0, "preprocess benchmark failed, see bench/results/logs/preprocess.log"
            write_json(out, {**json.loads(out.read_text()), "process": measured})
        if "predict" in args.only:
            out = RESULTS / "predict.json"
            command = python_command("predict_bench.py", "--repeats", "10" if args.quick else "50", "--out", str(out))
            measured = measure(command, RESULTS / "logs" / "predict.log")
            assert measured["rc"] == 0, "prediction benchmark failed, see bench/results/logs/predict.log"
            write_json(out, {**json.loads(out.read_text()), "process": measured})
        if "inference" in args.only:
            checkpoint = random_checkpoint(work / "model.pt")
            results = run_inference(folder, checkpoint, work, repeats=1 if args.quick else 3)
            write_json(RESULTS / "inference.json", {"variants": results, "load": load(), "machine": machine()})
            out = RESULTS / "profile_inference.json"
            command = python_command("profile_inference.py", "--dataset_dir", str(folder), "--ckpt_path",
                                     str(checkpoint), "--out", str(out))  # fmt: skip
            measured = measure(command, RESULTS / "logs" / "profile_inference.log")
            assert measured["rc"] == 0, "inference profile failed, see bench/results/logs/profile_inference.log"
            write_json(out, {**json.loads(out.read_text()), "process": measured})
        if "train" in args.only:
            for name, description, mode, epochs, overrides in TRAIN_RUNS:
                if args.runs and name not in args.runs:
                    continue
                epochs = min(epochs, 2) if args.quick else epochs
                out = RESULTS / f"train_{name}.json"
                command = python_command("train_bench.py", "--dataset_dir", args.dataset_dir, *datalist,
                                         "--epochs", str(epochs), "--mode", mode, "--override", json.dumps(overrides),
                                         "--out", str(out), *EXTRA_ARGS.get(name, []))  # fmt: skip
                if args.quick:
                    command += ["--epoch_length", "4"]
                print(f"train {name}: {' '.join(command)}", flush=True)
                measured = measure(command, RESULTS / "logs" / f"train_{name}.log")
                if measured["rc"] != 0:
                    print(f"train {name} failed (exit {measured['rc']}), see bench/results/logs/train_{name}.log")
                    continue
                result = json.loads(out.read_text())
                write_json(out, {**result, "name": name, "description": description, "process": measured})
                print(f"train {name}: {result['summary']}", flush=True)
        if "precision" in args.only:
            results = run_precision(args.dataset_dir, datalist, work)
            if results:
                write_json(RESULTS / "precision.json", {"splits": results, "machine": machine()})
    previous = json.loads((RESULTS / "run.json").read_text()).get("invocations", []) if (
        RESULTS / "run.json").is_file() else []  # fmt: skip
    this = {**info, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_at_end": load(), "parts": args.only,
            "runs": args.runs, "command": " ".join(sys.argv)}  # fmt: skip
    write_json(RESULTS / "run.json", {"invocations": previous + [this]})
    if not args.no_report:
        import report

        report.main()


if __name__ == "__main__":
    main()
