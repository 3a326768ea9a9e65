"""Preprocessing cost per image, one thread (as in a data-loader worker).

- ``deterministic``: the cached part of train.json's preprocessing (load image and masks, one channel, resize to
  the configured size, median filter, percentile scaling), with the 3 x 3 median filter (MONAI's ``MedianSmoothd``,
  ``median_radius`` 1, recorded as ``median``) and without it (``median_radius`` 0, recorded as ``none``); and the
  filtering step alone, on the resized image.
- ``random``: the per-epoch part (train.json's random augmentations + intensity normalisation) on a cached item,
  mean over items and draws, with MONAI's metadata tracking (``MetaTensor``, the default) and without it
  (``set_track_meta(False)``); and collating a batch of 16 such items, with and without metadata.
- ``list_images``: the check that ``scripts.io.list_images`` makes of each file before prediction (one decode).

Usage::

    python bench/preprocess_bench.py --dataset_dir DIR --out result.json [--num_images 60]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

from common import BUNDLE_ROOT, REPO_ROOT, machine, median, write_json

# recorded option name -> train.json's median_radius (the names of the results recorded before MedianSmoothd)
METHODS = {"none": 0, "median": 1}


def per_item_ms(function, items, repeats: int = 1, random: bool = False) -> list[float]:
    """Milliseconds per item: the fastest of ``repeats`` runs, or for random transforms (whose cost depends on
    the draw: a transform with probability p is skipped otherwise) the mean of the runs."""
    times = []
    for item in items:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            function(item)
            runs.append(time.perf_counter() - start)
        times.append(1000 * (sum(runs) / len(runs) if random else min(runs)))
    return times


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--datalist", default=None)
    ap.add_argument("--num_images", type=int, default=60)
    ap.add_argument("--image_folder", default=None, help="a folder for the list_images check")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    os.chdir(REPO_ROOT)
    sys.path.insert(0, str(BUNDLE_ROOT))
    import cv2
    import monai
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    monai.utils.set_determinism(seed=0)

    def parser_for(method: str) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config("bundle/configs/train.json")
        parser.update({"dataset_dir": args.dataset_dir, "median_radius": METHODS[method]})
        if args.datalist:
            parser.update({"datalist": args.datalist})
        parser.parse(True)
        return parser

    parser = parser_for("median")
    datalist = parser.get_parsed_content("train#datalist")
    datalist = datalist() if callable(datalist) else datalist  # a "_mode_": "callable" component
    step = max(1, len(datalist) // args.num_images)
    items = datalist[::step][: args.num_images]
    results: dict = {"num_images": len(items), "image_size": list(parser["image_size"]), "deterministic_ms": {},
                     "denoise_only_ms": {}}  # fmt: skip
    warm_up = Compose(parser.get_parsed_content("deterministic_transforms"))
    for item in items:  # file cache, lazy imports and allocations warm before the first timed method
        warm_up(copy.deepcopy(item))

    for method in METHODS:
        transforms = parser_for(method).get_parsed_content("deterministic_transforms")
        pipeline = Compose(transforms)
        pipeline(copy.deepcopy(items[0]))  # warm-up
        results["deterministic_ms"][method] = median(per_item_ms(lambda i: pipeline(copy.deepcopy(i)), items))
        position = next(k for k, t in enumerate(transforms) if type(t).__name__ == "MedianSmoothd")
        before_denoise = Compose(transforms[:position])
        resized = [before_denoise(copy.deepcopy(i)) for i in items]
        denoise = transforms[position]
        results["denoise_only_ms"][method] = median(per_item_ms(denoise, resized, repeats=3))
        print(method, results["deterministic_ms"][method], results["denoise_only_ms"][method], flush=True)

    # each step of the deterministic pipeline (median_radius 1), median ms per image
    transforms = parser.get_parsed_content("deterministic_transforms")
    steps: dict[str, list[float]] = {type(t).__name__: [] for t in transforms}
    for item in items:
        data = copy.deepcopy(item)
        for transform in transforms:
            start = time.perf_counter()
            data = transform(data)
            steps[type(transform).__name__].append(1000 * (time.perf_counter() - start))
    results["deterministic_steps_ms"] = {name: median(times) for name, times in steps.items()}
    print("steps", results["deterministic_steps_ms"], flush=True)

    # percentile scaling: MONAI's transform (two torch.quantile sorts) vs both percentiles from one np.percentile
    import numpy as np

    scaling = next(t for t in transforms if type(t).__name__ == "ScaleIntensityRangePercentilesd")
    position = transforms.index(scaling)
    resized = [Compose(transforms[:position])(copy.deepcopy(i)) for i in items]

    def numpy_scaling(data: dict) -> np.ndarray:
        image = data["image"].numpy()
        low, high = np.percentile(image, [0.5, 99.5])
        return np.clip((image - low) / max(high - low, 1e-8), 0.0, 1.0)

    difference = max(
        float(np.abs(scaling(dict(d))["image"].numpy() - numpy_scaling(d)).max()) for d in resized
    )  # fmt: skip
    results["percentile_scaling_ms"] = {
        "monai": median(per_item_ms(lambda d: scaling(dict(d)), resized, repeats=3)),
        "numpy_one_call": median(per_item_ms(numpy_scaling, resized, repeats=3)),
        "max_abs_difference": difference,
    }
    print("percentile scaling", results["percentile_scaling_ms"], flush=True)

    cached = [Compose(parser.get_parsed_content("deterministic_transforms"))(copy.deepcopy(i)) for i in items]
    random_part = Compose(parser.get_parsed_content("train#random_transforms")
                          + parser.get_parsed_content("normalize_transforms"))  # fmt: skip
    random_part.set_random_state(seed=0)
    run_random = lambda d: random_part(dict(d))  # noqa: E731
    results["random_ms"] = {"meta": mean(per_item_ms(run_random, cached, repeats=5, random=True))}
    monai.data.set_track_meta(False)
    plain = [{k: v.as_tensor() for k, v in d.items()} for d in cached]
    results["random_ms"]["no_meta"] = mean(per_item_ms(run_random, plain, repeats=5, random=True))
    monai.data.set_track_meta(True)
    batch = [random_part(dict(d)) for d in cached[:16]]
    results["collate16_ms"] = {"meta": median(per_item_ms(monai.data.list_data_collate, [batch] * 5))}
    plain_batch = [{k: v.as_tensor() for k, v in d.items()} for d in batch]
    results["collate16_ms"]["no_meta"] = median(per_item_ms(monai.data.list_data_collate, [plain_batch] * 5))
    print("random", results["random_ms"], "collate", results["collate16_ms"], flush=True)

    if args.image_folder:
        from scripts.io import list_images

        start = time.perf_counter()
        listed = list_images(args.image_folder)
        results["list_images_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(listed)
        print("list_images", results["list_images_ms_per_image"], flush=True)
    results["machine"] = machine()
    write_json(__import__("pathlib").Path(args.out), results)


if __name__ == "__main__":
    main()
