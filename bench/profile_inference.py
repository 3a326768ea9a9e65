"""Where the time of an ``inference.json`` run goes: cProfile of the whole workflow, summed per stage.

Runs ``monai.bundle.run`` on a folder under ``cProfile`` and reports the cumulative time of each preprocessing
transform, the network call, each postprocessing transform and the writers, per image. cProfile slows
Python-heavy code more than native kernels, so read the shares, not the absolute numbers.

Usage::

    python bench/profile_inference.py --dataset_dir IMAGES --ckpt_path model.pt --out result.json
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
from pathlib import Path

from common import BUNDLE_ROOT, REPO_ROOT, machine, write_json


def stage_functions() -> list[tuple[str, object]]:
    """(stage, function) in workflow order; each function's code object names its cProfile entry exactly."""
    import ignite.engine
    import monai.data
    import monai.transforms as mt

    from scripts import inferers, io, transforms

    return [
        ("list and check the files (before the run)", io.list_images),
        ("LoadImaged", mt.LoadImaged.__call__),
        ("SingleChannel2Dd", transforms.SingleChannel2Dd.__call__),
        ("Resized (anti-aliased)", mt.Resized.__call__),
        ("MedianSmoothd (3 x 3)", mt.MedianSmoothd.__call__),
        ("ScaleIntensityRangePercentilesd", mt.ScaleIntensityRangePercentilesd.__call__),
        ("NormalizeIntensityd", mt.NormalizeIntensityd.__call__),
        ("EnsureTyped", mt.EnsureTyped.__call__),
        ("collate", monai.data.list_data_collate),
        ("network (AutocastInferer)", inferers.AutocastInferer.__call__),
        ("decollate", monai.data.decollate_batch),
        ("Activationsd (softmax)", mt.Activationsd.__call__),
        ("Invertd (back to the input size)", mt.Invertd.__call__),
        ("LesionLabelMapd", transforms.LesionLabelMapd.__call__),
        ("write: label map", io.save_label_map),
        ("write: overlay", io.save_overlay),
        ("write: tables", io.PredictionWriter.write_tables),
        ("whole evaluator run", ignite.engine.Engine.run),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    os.chdir(REPO_ROOT)
    sys.path.insert(0, str(BUNDLE_ROOT))
    from monai.bundle import run

    images = len([p for p in Path(args.dataset_dir).iterdir() if p.is_file()])
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="profile_") as out:
        profiler.enable()
        run(config_file="bundle/configs/inference.json", dataset_dir=args.dataset_dir, output_dir=out,
            ckpt_path=args.ckpt_path)  # fmt: skip
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (cc, nc, tottime, cumtime, callers)}
    stages = {}
    for stage, function in stage_functions():
        code = getattr(function, "__code__", None)
        key = (code.co_filename, code.co_firstlineno, code.co_name) if code else None
        cumulative = stats[key][3] if key in stats else 0.0
        stages[stage] = {"total_s": cumulative, "ms_per_image": 1000 * cumulative / max(images, 1)}
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:25]
    result = {
        "images": images,
        "stages": stages,
        "top_self_time": [{"function": f"{Path(k[0]).name}:{k[1]}:{k[2]}", "self_s": v[2], "cumulative_s": v[3]}
                          for k, v in top],  # fmt: skip
        "machine": machine(),
    }
    write_json(Path(args.out), result)
    for stage, value in stages.items():
        print(f"{stage:40s} {value['ms_per_image']:8.1f} ms/image")


if __name__ == "__main__":
    main()
