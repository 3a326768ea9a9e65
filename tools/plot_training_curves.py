"""Plot the per-epoch loss and metrics that a training run's StatsHandler logged.

    python tools/plot_training_curves.py --log runs/busi/train.log --output bundle/docs/training_curves.png
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS_LINE = re.compile(r"Epoch\[(?P<epoch>\d+)\] Metrics -- (?P<values>.*)$")
VALUE = re.compile(r"(?P<name>\w+): (?P<value>[-+0-9.eE]+|nan)")


def read_log(log: str) -> dict[str, dict[int, float]]:
    """Per-metric ``{epoch: value}`` from the ``Epoch[n] Metrics -- name: value ...`` lines of a log."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for line in Path(log).read_text(errors="replace").splitlines():
        match = METRICS_LINE.search(line)
        if match:
            for value in VALUE.finditer(match["values"]):
                series[value["name"]][int(match["epoch"])] = float(value["value"])
    return dict(series)


def plot(log: str, output: str, summary: str | None = None) -> str:
    """Draw loss, lesion Dice and classification curves for training and validation.

    Args:
        log: training log with StatsHandler epoch lines.
        output: PNG to write.
        summary: optional JSON file to write the series to.

    Returns:
        The output path.
    """
    series = read_log(log)
    panels = [
        ("loss", ["train_loss"]),
        ("lesion Dice", ["train_lesion_dice", "val_lesion_dice"]),
        ("classification", ["train_accuracy", "val_accuracy", "val_macro_f1"]),
        ("model selection score", ["val_score"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            if name in series:
                epochs = sorted(series[name])
                ax.plot(epochs, [series[name][e] for e in epochs], label=name, lw=1.4)
        if "val_score" in names and "val_score" in series:
            best = max(series["val_score"], key=series["val_score"].get)
            ax.axvline(best, color="grey", ls="--", lw=0.8)
            ax.text(best, ax.get_ylim()[0], f" best: epoch {best}", fontsize=8, va="bottom")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    if summary:
        Path(summary).write_text(json.dumps(series, indent=1))
    return output


if __name__ == "__main__":
    fire.Fire(plot)
