"""Record a real full training's wall time from its log, for the benchmarks table.

The table's "100 epochs" column is an estimate from a few epochs; this records what a complete run took::

    python bench/full_training.py --log runs/busi100/train.log [resumed.log ...] --command "python -m monai ..."

writes ``bench/results/full_training.json``: epochs run, wall time from the first to the last line of each log
(summed over the logs of an interrupted and resumed run), median trainer and validation time per epoch, the best
validation score and its epoch.
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime
from pathlib import Path

from common import machine, median, results_dir, write_json

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
TRAINER_EPOCH = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")
VAL_EPOCH = re.compile(r"SupervisedEvaluator - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")
TRAIN_METRICS = re.compile(r"Epoch\[(\d+)\] Metrics -- train")
BEST = re.compile(r"Key metric: val_score best value: ([\d.]+) at epoch: (\d+)")


def _seconds(match: re.Match) -> float:
    hours, minutes, seconds = match.group(2), match.group(3), match.group(4)
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def parse(log: Path) -> dict:
    """Epoch count, wall time and per-epoch times of a ``monai.bundle run training`` log."""
    stamps, trainer, validation, best, epochs = [], [], [], None, set()
    for line in log.read_text(errors="replace").replace("\r", "\n").splitlines():
        if stamp := STAMP.match(line):
            stamps.append(datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f"))
        if match := TRAINER_EPOCH.search(line):
            trainer.append(_seconds(match))
        if match := VAL_EPOCH.search(line):
            validation.append(_seconds(match))
        if match := TRAIN_METRICS.search(line):
            epochs.add(int(match.group(1)))
        if match := BEST.search(line):
            best = {"val_score": float(match.group(1)), "epoch": int(match.group(2))}
    if not trainer:
        raise ValueError(f"{log}: no completed training epoch found.")
    return {
        # an epoch ended by early stopping logs its metrics but no "Complete" line
        "epochs": len(epochs),
        "wall_s": (stamps[-1] - stamps[0]).total_seconds(),
        "first_log_line": stamps[0].isoformat(sep=" "),
        "last_log_line": stamps[-1].isoformat(sep=" "),
        "trainer_epoch_s": trainer,
        "validation_s": validation,
        "best": best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True, type=Path, nargs="+", help="the training log(s), in order")
    ap.add_argument("--command", required=True, help="the command that ran the training (recorded as is)")
    ap.add_argument("--conditions", default="", help="how the machine was used meanwhile")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/<machine kind>/full_training.json")
    args = ap.parse_args()
    parts = [parse(log) for log in args.log]
    result = {
        "epochs": sum(p["epochs"] for p in parts),
        "wall_s": sum(p["wall_s"] for p in parts),
        "first_log_line": parts[0]["first_log_line"],
        "last_log_line": parts[-1]["last_log_line"],
        "median_trainer_epoch_s": median([s for p in parts for s in p["trainer_epoch_s"]]),
        "median_validation_s": median([s for p in parts for s in p["validation_s"]]),
        "best": parts[-1]["best"],
        "logs": [{k: v for k, v in p.items() if not k.endswith("_s") or k == "wall_s"} for p in parts],
        "command": args.command,
        "conditions": args.conditions,
        "machine": machine(),
    }
    write_json(args.out or results_dir() / "full_training.json", result)
    print(result)


if __name__ == "__main__":
    main()
