"""Render bench/results/<machine kind>/*.json as the tables of bundle/docs/benchmarks.md, one section per kind.

Only the part between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced; the text around it
(the analysis) is kept. Run ``python bench/report.py`` after ``bench/run_all.py`` (which calls it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common import BUNDLE_ROOT
from preprocess_bench import METHODS

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
RESULTS = RESULTS_ROOT  # the machine kind being rendered (set by ``render``)
DOC = BUNDLE_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
TARGET_MINUTES, TARGET_SPEEDUP, TARGET_LATENCY_MS, TARGET_METRIC_DELTA = 60.0, 3.0, 25.0, 0.01
TRAIN_ORDER = ("default", "fp32", "bf16", "no_channels_last", "no_cache", "prelu_dropout", "speed_switches_off",
               "no_meta", "nice_workers", "tuned")


def read(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def loads(*records: dict) -> str:
    """1-minute load average before / after, and the CPU other processes used during the run (in cores)."""
    processes = [r["process"] for r in records]
    values = [p["load_before"][0] for p in processes] + [p["load_after"][0] for p in processes]
    other = max(p.get("other_cores", float("nan")) for p in processes)
    return f"{min(values):.1f}-{max(values):.1f}, other {fmt(other, 2)}"


def epochs_counted(result: dict) -> str:
    """Epochs in the medians (not the first; not those during which other processes were busy)."""
    n = len(result["epochs"])
    used = result["summary"].get("epochs_used")
    text = f"{len(used)} of {n}" if used is not None else (f"{n - 1} of {n}" if n > 1 else "1 of 1")
    contended = result["summary"].get("contended_epochs")
    return text + (f" (left out, contended: {', '.join(map(str, contended))})" if contended else "")


def training_section(lines: list[str], targets: list) -> None:
    runs = {name: read(f"train_{name}") for name in TRAIN_ORDER}
    runs = {k: v for k, v in runs.items() if v}
    unet, densenet = read("train_two_model_unet"), read("train_two_model_densenet")
    if not runs:
        return
    off = runs.get("speed_switches_off")
    base_ips = off["summary"]["images_per_s"] if off else None
    first = next(iter(runs.values()))
    # results from before the bundle moved to 128 px carry no size: they were measured at 256 px, 100 epochs
    size, epochs = first.get("image_size", [256, 256]), first.get("max_epochs", 100)
    size_text = " x ".join(str(v) for v in size)
    lines += [
        f"### Training throughput (BUSI, {size_text}, batch 16)",
        "",
        "Images/s: training images over the time from the first to the last iteration of an epoch (median over",
        "the epochs after the first, leaving out epochs during which other processes used more than 0.15 cores);",
        "the parts of an epoch's training time: waiting for the data loader,",
        "network step (forward, loss, backward, optimizer), other (postprocessing, training metrics, handlers).",
        f"Epoch: training + validation (118 images) + checkpointing. {epochs} epochs (the recipe's): cache + "
        f"{epochs} x epoch.",
        "Memory: peak RSS of the main process / peak PSS summed over the process tree (main + data-loader workers).",
        "Load: 1-minute load average before-after the run; other CPU: CPU time of all other processes of the",
        "machine during the run, in cores (0 = otherwise idle, 1 = another process kept a core busy).",
        "",
        "| configuration | images/s | x vs switches off | epoch (s) | data wait / network / other (s) | validation (s) "
        f"| cache (s) | {epochs} epochs (min) | peak RSS / tree PSS (MiB) | epochs counted | load, other CPU (cores) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for name, r in runs.items():
        s = r["summary"]
        minutes = (r["cache_s"] + epochs * s["epoch_s"]) / 60
        ratio = s["images_per_s"] / base_ips if base_ips else float("nan")
        lines.append(
            f"| `{name}`: {r['description']} | {fmt(s['images_per_s'])} | {fmt(ratio, 2)} | {fmt(s['epoch_s'])} | "
            f"{fmt(s['data_wait_s'])} / {fmt(s['network_s'])} / {fmt(s['other_s'])} | {fmt(s['val_s'])} | "
            f"{fmt(r['cache_s'])} | {fmt(minutes, 0)} | {fmt(r['process']['peak_rss_mb'], 0)} / "
            f"{fmt(r['process']['peak_tree_pss_mb'], 0)} | {epochs_counted(r)} | {loads(r)} |"
        )
    if unet and densenet:
        a, b = unet["summary"]["images_per_s"], densenet["summary"]["images_per_s"]
        combined = 1 / (1 / a + 1 / b)
        ratio = combined / base_ips if base_ips else float("nan")
        train_s = unet["summary"]["train_s"] + densenet["summary"]["train_s"]
        for name, r in (("two_model_unet", unet), ("two_model_densenet", densenet)):
            s = r["summary"]
            lines.append(
                f"| `{name}`: {r['description']}, {r['parameters'] / 1e6:.2f} M parameters | {fmt(s['images_per_s'])} "
                f"| | {fmt(s['train_s'])} (no validation) | {fmt(s['data_wait_s'])} / {fmt(s['network_s'])} / "
                f"{fmt(s['other_s'])} | | {fmt(r['cache_s'])} | | {fmt(r['process']['peak_rss_mb'], 0)} / "
                f"{fmt(r['process']['peak_tree_pss_mb'], 0)} | {epochs_counted(r)} | {loads(r)} |"
            )
        lines.append(
            f"| **two-model pipeline** (UNet then DenseNet121 on every image) | **{fmt(combined)}** | "
            f"{fmt(ratio, 2)} | "
            f"{fmt(train_s)} (no validation) | | | | {fmt((unet['cache_s'] + epochs * train_s) / 60, 0)} | | | |"
        )
    lines.append("")
    default = runs.get("default")
    if default:
        lines.append(f"Parameters: multi-task network {default['parameters'] / 1e6:.2f} M"
                     + (f"; UNet {unet['parameters'] / 1e6:.2f} M + DenseNet121 {densenet['parameters'] / 1e6:.2f} M = "
                        f"{(unet['parameters'] + densenet['parameters']) / 1e6:.2f} M" if unet and densenet else "")
                     + ".")  # fmt: skip
        lines.append("")
        minutes = (default["cache_s"] + epochs * default["summary"]["epoch_s"]) / 60
        targets.append((f"{epochs}-epoch BUSI training at {size_text} (estimate)", f"<= {TARGET_MINUTES:.0f} min",
                        f"{minutes:.0f} min (cache {default['cache_s']:.0f} s + {epochs} x "
                        f"{default['summary']['epoch_s']:.1f} s)",
                        minutes <= TARGET_MINUTES))  # fmt: skip
    full = read("full_training")
    if full:
        minutes = full["wall_s"] / 60
        lines += [
            "### A complete BUSI training, timed",
            "",
            f"`{full['command']}`: {full['epochs']} epochs in {minutes:.1f} min (first to last line of each log, "
            f"{len(full.get('logs', [full]))} log(s), {full['first_log_line']} - {full['last_log_line']}); "
            f"median {full['median_trainer_epoch_s']:.1f} s per epoch (training + validation), "
            f"validation {full['median_validation_s']:.1f} s. "
            f"{full['conditions']}",
            "",
        ]
        per_run = minutes * epochs / full["epochs"]
        targets.append((f"{epochs}-epoch BUSI training at {size_text} (measured)", f"<= {TARGET_MINUTES:.0f} min",
                        f"{minutes:.1f} min for {full['epochs']} epochs ({per_run:.1f} min per {epochs})",
                        per_run <= TARGET_MINUTES))  # fmt: skip
        if off:
            ratio = default["summary"]["images_per_s"] / base_ips
            targets.append(("training images/s vs speed switches off", f">= {TARGET_SPEEDUP:.0f}x",
                            f"{ratio:.2f}x ({default['summary']['images_per_s']:.1f} vs {base_ips:.1f} images/s)",
                            ratio >= TARGET_SPEEDUP))  # fmt: skip
    fp32 = runs.get("fp32")
    seeds = {"default_seed1": read("train_default_seed1"), "fp32_seed1": read("train_fp32_seed1")}
    if default and fp32 and not default.get("machine", {}).get("native_bf16", True):
        lines += ["The default trains in float32 on this CPU (no native bf16), so there is no bf16 vs float32 "
                  "comparison here; forced bf16 (`bf16` above) runs at a tenth of the speed.", ""]
    elif default and fp32:
        n = min(len(default["epochs"]), len(fp32["epochs"]))

        def at(result: dict | None) -> dict | None:
            return result["epochs"][n - 1]["val_metrics"] if result and len(result["epochs"]) >= n else None

        d, f, d1, f1 = at(default), at(fp32), at(seeds["default_seed1"]), at(seeds["fp32_seed1"])
        header = "| metric | bf16 seed 0 | float32 seed 0 | bf16 - float32 (seed 0) |"
        rule = "| --- | ---: | ---: | ---: |"
        if d1 and f1:
            header += " bf16 seed 1 | float32 seed 1 | bf16 - float32 (seed 1) | seed 0 - seed 1 (bf16, float32) |"
            rule += " ---: | ---: | ---: | ---: |"
        lines += [
            f"### bf16 vs float32 training: validation after {n} epochs (118 images)",
            "",
            "Same seed, so the same initial weights, data order and augmentation; the only difference is the",
            "arithmetic. Seed 1 repeats the pair, to show how far two runs differ for reasons other than precision.",
            "",
            header,
            rule,
        ]
        for key in ("val_lesion_dice", "val_accuracy", "val_macro_f1", "val_score"):
            row = f"| {key} | {d[key]:.4f} | {f[key]:.4f} | {d[key] - f[key]:+.4f} |"
            if d1 and f1:
                row += (f" {d1[key]:.4f} | {f1[key]:.4f} | {d1[key] - f1[key]:+.4f} | "
                        f"{d[key] - d1[key]:+.4f}, {f[key] - f1[key]:+.4f} |")  # fmt: skip
            lines.append(row)
        lines.append("")
        for key, label in (("val_lesion_dice", "validation lesion Dice"), ("val_accuracy", "validation accuracy")):
            delta = abs(d[key] - f[key])
            targets.append((f"{label}, bf16 vs float32 training, {n} epochs, seed 0",
                            f"within {TARGET_METRIC_DELTA}",
                            f"{d[key]:.3f} vs {f[key]:.3f} (difference {delta:.3f})",
                            delta <= TARGET_METRIC_DELTA))  # fmt: skip
    precision = read("precision")
    if precision:
        splits = precision["splits"]
        lines += [
            "### bf16 vs float32 prediction with the same weights (the shipped `bundle/models/model.pt`)",
            "",
            "`evaluate.json` on each split with `--amp True --channels_last True` (default) and `--amp False "
            "--channels_last False`.",
            "",
            "| split | metric | bf16 | float32 | difference |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for split in ("validation", "test"):
            b, f = splits.get(f"{split}_bf16"), splits.get(f"{split}_fp32")
            if not (b and f):
                continue
            for key in ("lesion_dice", "accuracy", "macro_f1"):
                lines.append(f"| {split} ({b['num_images']}) | {key} | {b[key]:.4f} | {f[key]:.4f} | "
                             f"{b[key] - f[key]:+.4f} |")  # fmt: skip
            for key, label in (("lesion_dice", "lesion Dice"), ("accuracy", "accuracy")):
                delta = abs(b[key] - f[key])
                targets.append((f"{split} {label}, bf16 vs float32 prediction, same weights",
                                f"within {TARGET_METRIC_DELTA}",
                                f"{b[key]:.3f} vs {f[key]:.3f} (difference {delta:.3f})",
                                delta <= TARGET_METRIC_DELTA))  # fmt: skip
        lines.append("")


def prediction_section(lines: list[str], targets: list) -> None:
    predict = read("predict")
    if predict:
        b = predict["backends"]
        eager = b.get("eager")
        lines += [
            f"### Network prediction, {predict['size']} x {predict['size']}, {predict['threads']} threads "
            f"(load {loads(predict)})",
            "",
            "Network only (no pre- or post-processing); batch 1: median (90th percentile) over the timed runs.",
            "",
            "| back-end | batch 1 (ms) | batch 16 (images/s) | batch 16 x vs eager float32 | build (s) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in b.items():
            ratio = r["batch16_images_per_s"] / eager["batch16_images_per_s"] if eager else float("nan")
            lines.append(f"| {name} | {fmt(r['batch1_ms'])} ({fmt(r['batch1_p90_ms'])}) | "
                         f"{fmt(r['batch16_images_per_s'])} | {fmt(ratio, 2)} | {fmt(r['build_s'])} |")  # fmt: skip
        lines.append("")
        lines.append(f"Peak RSS of the prediction benchmark process (all four back-ends loaded): "
                     f"{fmt(predict['process']['peak_rss_mb'], 0)} MiB.")  # fmt: skip
        lines.append("")
        best = min(b.items(), key=lambda item: item[1]["batch1_ms"])
        default = b.get("eager_bf16")
        if default:
            targets.append(("batch-1 latency, bundle default (eager bf16)", f"<= {TARGET_LATENCY_MS:.0f} ms",
                            f"{default['batch1_ms']:.1f} ms", default["batch1_ms"] <= TARGET_LATENCY_MS))  # fmt: skip
        targets.append(("batch-1 latency, fastest back-end", f"<= {TARGET_LATENCY_MS:.0f} ms",
                        f"{best[1]['batch1_ms']:.1f} ms ({best[0]})",
                        best[1]["batch1_ms"] <= TARGET_LATENCY_MS))  # fmt: skip
    inference = read("inference")
    if inference:
        lines += [
            "### End to end: `inference.json` on generated images (BUSI-like sizes, 450-600 x 500-780 pixels)",
            "",
            "Wall: the whole command (start-up, model loading, listing and checking the files, prediction, writing "
            "label maps, overlays and tables); engine: the evaluator's run. Median of the repeats.",
            "",
            "| run | images | wall (s) | engine (s) | engine ms / image | peak RSS / tree PSS (MiB) "
            "| load, other CPU (cores) |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for name, r in inference["variants"].items():
            args = " ".join(r["args"]) or "defaults (batch 1, no workers)"
            runs = r["runs"]
            load_range = loads(*({"process": x} for x in runs))
            lines.append(f"| {name} (`{args}`) | {r['images']} | {fmt(r['wall_s'])} | {fmt(r['engine_s'])} | "
                         f"{fmt(1000 * r['engine_s'] / r['images'], 0)} | {fmt(r['peak_rss_mb'], 0)} / "
                         f"{fmt(r['peak_tree_pss_mb'], 0)} | {load_range} |")  # fmt: skip
        lines.append("")


def preprocessing_section(lines: list[str]) -> None:
    pre = read("preprocess")
    if not pre:
        return
    size = " x ".join(map(str, pre.get("image_size", [256, 256])))  # earlier results carry no size: 256 px then
    lines += [
        f"### Preprocessing per image (one thread, {pre['num_images']} BUSI training images, load {loads(pre)})",
        "",
        f"Deterministic part (cached once by `CacheDataset`): load image and masks, one channel, resize to {size}, "
        "denoise, percentile scaling. Median ms per image.",
        "",
        f"| denoise | deterministic pipeline (ms) | denoising alone, {size} (ms) | 546 training images (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    # options recorded before the filter became MONAI's MedianSmoothd (bilateral, nlmeans) are left out of the table
    for method in (m for m in pre["deterministic_ms"] if m in METHODS):
        ms = pre["deterministic_ms"][method]
        lines.append(f"| {method} | {fmt(ms)} | {fmt(pre['denoise_only_ms'][method], 2)} | {fmt(546 * ms / 1000)} |")
    if "deterministic_steps_ms" in pre:
        steps = pre["deterministic_steps_ms"]
        lines += ["", "Steps of the deterministic pipeline (denoise median), median ms per image: "
                  + ", ".join(f"{name} {fmt(ms, 2)}" for name, ms in steps.items()) + "."]  # fmt: skip
    if "percentile_scaling_ms" in pre:
        p = pre["percentile_scaling_ms"]
        lines += ["", f"Percentile scaling alone: MONAI's `ScaleIntensityRangePercentilesd` {fmt(p['monai'], 2)} ms "
                  f"(two `torch.quantile` sorts) vs both percentiles from one `np.percentile` call "
                  f"{fmt(p['numpy_one_call'], 2)} ms, same output (max difference {p['max_abs_difference']:.1e})."]
    r, c = pre["random_ms"], pre["collate16_ms"]
    lines += [
        "",
        "Per epoch (data-loader workers): random augmentation + normalisation, mean ms per image; collating a batch "
        "of 16.",
        "",
        "| | with metadata (MetaTensor, default) | without (`set_track_meta(False)`) |",
        "| --- | ---: | ---: |",
        f"| augmentation per image (ms) | {fmt(r['meta'], 2)} | {fmt(r['no_meta'], 2)} |",
        f"| collate 16 (ms) | {fmt(c['meta'], 2)} | {fmt(c['no_meta'], 2)} |",
        "",
    ]
    if "list_images_ms_per_image" in pre:
        lines += [f"`scripts.io.list_images` check before prediction: {fmt(pre['list_images_ms_per_image'])} ms per "
                  "generated image (one extra decode).", ""]  # fmt: skip


def profile_section(lines: list[str]) -> None:
    profile = read("profile_inference")
    if not profile:
        return
    lines += [
        f"### Where an `inference.json` run spends its time (cProfile, {profile['images']} generated images)",
        "",
        "Cumulative time per stage, ms per image (cProfile inflates Python-heavy steps; read the shares).",
        "",
        "| stage | ms / image |",
        "| --- | ---: |",
    ]
    lines += [f"| {stage} | {fmt(v['ms_per_image'])} |" for stage, v in profile["stages"].items()]
    lines.append("")


def render_kind(folder: Path) -> list[str]:
    """The tables of one machine kind's results folder."""
    global RESULTS
    RESULTS = folder
    run = read("run") or {}
    invocations = run.get("invocations", [run] if run else [])
    m = invocations[0].get("machine", {}) if invocations else {}
    capability = m.get("cpu_capability", "not recorded (an AVX-512 BF16 CPU)")
    lines = [
        f"## {folder.name.replace('-', ' ').replace('cpu', 'CPU', 1)}",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, CPU capability {capability}, "
        f"native bf16 {m.get('native_bf16', True)}, torch {m.get('torch', '?')} "
        f"({m.get('torch_threads', '?')} intra-op threads), MONAI {m.get('monai', '?')}, "
        f"Python {m.get('python', '?')}.",
        "",
    ]
    for run in invocations:
        lines.append(f"- `{run.get('command', 'bench/run_all.py')}`: {run.get('started', '?')} - "
                     f"{run.get('finished', '?')}, parts {', '.join(run.get('parts', []))}"
                     + (f" (runs {', '.join(run['runs'])})" if run.get("runs") else "")
                     + (" QUICK SMOKE RUN: not valid numbers" if run.get("quick") else "") + ".")  # fmt: skip
    lines.append("")
    targets: list = []
    training_section(lines, targets)
    prediction_section(lines, targets)
    profile_section(lines)
    preprocessing_section(lines)
    if targets:
        lines += ["### Targets (this machine)", "", "| target | goal | measured | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {t} | {goal} | {value} | {'yes' if ok else '**no**'} |" for t, goal, value, ok in targets]
        lines.append("")
    return lines


def render() -> str:
    """Every machine kind's section (folders of ``bench/results`` holding a ``run.json``), between the markers."""
    lines = [START, ""]
    for folder in sorted(p.parent for p in RESULTS_ROOT.glob("*/run.json")):
        lines += render_kind(folder)
    lines.append(END)
    return "\n".join(lines)


SKELETON = """# Benchmarks

Measured with one command from the repository root (see `bench/README.md`):

```bash
python bench/run_all.py --dataset_dir /path/to/Dataset_BUSI_with_GT
```

{results}
"""


def main() -> None:
    table = render()
    if DOC.is_file() and START in DOC.read_text():
        text = DOC.read_text()
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1] if END in rest else ""
        DOC.write_text(before + table + after)
    else:
        DOC.write_text(SKELETON.format(results=table))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
