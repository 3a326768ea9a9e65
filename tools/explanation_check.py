"""How well the optional Grad-CAM map of ``inference.json`` (``--explanation_maps true``) points at the lesion.

For every lesion image of a split that the shipped weights classify benign or malignant (the decision of
``inference.json``: calibrated probabilities and the malignant operating point), the map of the predicted class is
compared with the expert mask at the network's input size:

- ``pointing``: share of images whose map maximum lies inside the lesion (the "pointing game");
- ``energy_in_lesion``: mean share of the map's sum inside the lesion, next to ``lesion_area``, the mean share of the
  image the lesion covers (a map that ignores the lesion scores about ``lesion_area``);
- ``seconds_per_image``: the map's cost.

Usage::

    python tools/explanation_check.py --dataset_dir ../shared/data/Dataset_BUSI_with_GT --split validation
    python tools/explanation_check.py --dataset_dir ... --layers '["encoder.stages.6.0.depthwise"]'  # other layers
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402

from scripts.reliability import ClassActivationMapd  # noqa: E402


def main(dataset_dir: str, split: str = "validation", layers: tuple = ("",), out: str | None = None) -> dict:
    """Score the maps of each layer in ``layers`` on ``split`` and print (and optionally write) the result.

    Args:
        dataset_dir: the BUSI folder.
        split: datalist split.
        layers: module names of the network to explain (``""``: the default, the last encoder stage).
        out: JSON file for the result.
    """
    inference = json.loads((ablate.BUNDLE / "configs" / "inference.json").read_text())
    ckpt = str(ablate.BUNDLE / "models" / "model.pt")
    outputs = ablate.predict_split(dataset_dir, ckpt, {}, split=split)
    logits = outputs["views_logits"][0] / inference["cls_temperature"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    predicted = probs.argmax(1)
    predicted[probs[:, 2] >= inference["malignant_threshold"]] = 2
    parser = ablate._parser(dataset_dir, {"validate#split": split})
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    items = parser.get_parsed_content("validate#datalist")()
    network = ablate.load_network(parser, ckpt).eval()
    result: dict = {"split": split, "images": 0}
    for layer in layers:
        explain = ClassActivationMapd(network, enabled=True, layer=layer or None, reference_key="image")
        hits, energy, area, seconds = [], [], [], []
        for index, item in enumerate(items):
            lesion = outputs["label"][index] > 0
            if not lesion.any() or predicted[index] == 0:
                continue
            data = preprocessing(item)
            start = time.perf_counter()
            heat = explain({"image": data["image"], "cls_pred": int(predicted[index])})["cam"][0].numpy()
            seconds.append(time.perf_counter() - start)
            hits.append(bool(lesion.flat[int(heat.argmax())]))
            energy.append(float(heat[lesion].sum() / max(heat.sum(), 1e-12)))
            area.append(float(lesion.mean()))
        result["images"] = len(hits)
        result[layer or "default"] = {
            "pointing": float(np.mean(hits)),
            "energy_in_lesion": float(np.mean(energy)),
            "lesion_area": float(np.mean(area)),
            "seconds_per_image": float(np.median(seconds)),
        }
        print(layer or "default", json.dumps(result[layer or "default"]), flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    fire.Fire(main)
