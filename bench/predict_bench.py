"""Network prediction speed of each back-end: latency at batch 1 and throughput at batch 16 (256 x 256 input).

Back-ends (``bench/backends.py``, checked against eager PyTorch by ``tests/test_inference_backends.py``): eager
float32 with and without channels-last, bf16 autocast, the bundle's default (``amp: auto``), TorchScript
(scripted, frozen, optimised for inference), ONNX Runtime (CPU provider) and, when asked for, ``torch.compile``.
Times exclude pre- and post-processing; the weights are the configuration's initial ones (the speed does not
depend on their values), and the network is inference.json's.

Usage::

    python bench/predict_bench.py --out result.json [--repeats 50] [--threads 2]
    python bench/predict_bench.py --out result.json --members 3  # an ensemble of three networks
    python bench/predict_bench.py --out result.json --members 3 --encoder efficientnet-lite0  # of another encoder
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import BUNDLE_ROOT, REPO_ROOT, machine, median, write_json


def timed(predict, x, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=50, help="timed runs at batch 1 (batch 16: a fifth of them)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--members", type=int, default=1, help="networks in the ensemble (scripts.net.MultiTaskEnsemble)")
    ap.add_argument("--encoder", default=None, help="network_def#encoder (default: inference.json's)")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="default: backends.BACKENDS and the optional ones (torch.compile)")  # fmt: skip
    args = ap.parse_args()

    os.chdir(REPO_ROOT)
    sys.path.insert(0, str(BUNDLE_ROOT))
    import backends
    import torch
    from monai.bundle import ConfigParser

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config("bundle/configs/inference.json")
    parser["network_def#num_members"] = args.members
    if args.encoder:
        parser["network_def#encoder"] = args.encoder
    parser["network_def#return_embedding"] = False  # the outputs of the exports (pred, cls), as ckpt_export makes them
    network = parser.get_parsed_content("network_def").eval()
    single = torch.randn(1, 1, args.size, args.size)
    batch = torch.randn(16, 1, args.size, args.size)
    results = {}
    for name in args.backends or backends.BACKENDS + backends.OPTIONAL_BACKENDS:
        start = time.perf_counter()
        predict = backends.make_predictor(name, network, example=single)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        predict(single)  # torch.compile compiles here
        first_call_s = time.perf_counter() - start
        latency = timed(predict, single, args.repeats, warmup=5)
        throughput = timed(predict, batch, max(3, args.repeats // 5), warmup=2)
        results[name] = {
            "build_s": build_s,
            "first_call_s": first_call_s,
            "batch1_ms": 1000 * median(latency),
            "batch1_p90_ms": 1000 * sorted(latency)[int(0.9 * (len(latency) - 1))],
            "batch16_ms": 1000 * median(throughput),
            "batch16_images_per_s": 16 / median(throughput),
        }
        print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
        if hasattr(predict, "inferer"):  # autocast on or off, as forced or as amp "auto" decided at the first call
            results[name]["autocast"] = predict.inferer.enabled
    write_json(
        __import__("pathlib").Path(args.out),
        {"size": args.size, "members": args.members, "encoder": parser["network_def#encoder"],
         "threads": torch.get_num_threads(), "backends": results, "machine": machine()},  # fmt: skip
    )


if __name__ == "__main__":
    main()
