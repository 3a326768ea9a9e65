"""Fit and measure how far the shipped model's answers can be trusted: calibration, uncertainty, unassessable inputs.

Everything is fitted or chosen on the validation split (and the training split for the embedding statistics);
the test split is only scored, once, with what was chosen:

1. **Calibration**: one temperature for the class logits, fitted by negative log-likelihood on validation, the
   images as they are and under the training augmentation (scanner-like changes); expected calibration error (15
   equal-width confidence bins) and a reliability diagram before and after, and the ECE that a perfectly
   calibrated model would show on a sample of the test split's size.
2. **Uncertainty**: candidate per-image scores, each ranked by how well it finds mistakes (AUROC for a wrong class
   and for lesion Dice < 0.5) on validation; the test split gets the same AUROCs and the accuracy left after
   deferring the 10 % most uncertain images.
3. **Inputs that are not breast ultrasound**: the input check (tiny or near-uniform images) and the Mahalanobis
   distance of the network's embedding (texture statistics of a mid-level encoder stage) to the training images
   (shrunk covariance); the distance threshold is the ``quantile`` of the validation distances, the validation
   images taken as they are and under the training augmentation (so that scanner-like changes stay assessable).
   Scored against blank and noise images, natural photographs and other modalities from the sample data of
   installed packages (scikit-image, pydicom, nibabel), with the BUSI test images as the in-distribution side.

4. **Malignant operating point**: the ``p(malignant)`` threshold (calibrated) that reaches ``sensitivity`` malignant
   recall on validation and its augmented draws (``threshold_rule``), with the specificity it costs on validation
   and test; the same for recall targets 0.90, 0.95 and 1.0 on clean validation (``alternatives``) and for every
   rule (``rules``), also scored under the training augmentation.

Usage (writes ``bundle/models/embedding_stats.pt``, sets ``cls_temperature``, ``max_embedding_distance`` and
``malignant_threshold`` in ``inference.json`` (``cls_temperature`` also in ``evaluate.json``), and writes the
measurements to ``bundle/docs/calibration.json`` and a reliability diagram)::

    python tools/calibrate.py --dataset_dir ../shared/data/Dataset_BUSI_with_GT
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402

BUNDLE = ablate.BUNDLE
sys.path.insert(0, str(BUNDLE))
from scripts.metrics import lesion_dice_iou  # noqa: E402
from scripts.reliability import mahalanobis_distance, mask_disagreement, normalized_entropy  # noqa: E402

CONFIGS = BUNDLE / "configs"
STATS_FILE = BUNDLE / "models" / "embedding_stats.pt"
DOCS = BUNDLE / "docs"
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 241))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, list[dict]]:
    """ECE of the top-class confidence over equal-width bins, and the bins (for a reliability diagram).

    Args:
        probs: class probabilities ``(N, C)``.
        labels: true classes ``(N,)``.
        bins: number of confidence bins over [0, 1].

    Returns:
        ``(ece, [{"low", "high", "count", "confidence", "accuracy"}, ...])``.
    """
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = (predicted == labels).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, table = 0.0, []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if not inside.any():
            continue
        gap = abs(confidence[inside].mean() - correct[inside].mean())
        ece += inside.mean() * gap
        table.append({"low": float(low), "high": float(high), "count": int(inside.sum()),
                      "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())})
    return float(ece), table


def softmax(log_probs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from log-probabilities (logits up to a constant) at a temperature."""
    return torch.softmax(torch.as_tensor(log_probs) / temperature, dim=-1).numpy()


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of minimal negative log-likelihood, searched on a fine logarithmic grid (0.25 to 8)."""
    logits, target = torch.as_tensor(log_probs), torch.as_tensor(labels).long()
    nll = [float(torch.nn.functional.cross_entropy(logits / t, target)) for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the ``positive`` images (NaN where one side is empty)."""
    from monai.metrics import compute_roc_auc

    if positive.all() or not positive.any():
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(positive.astype(float))))


def _entropy(probs: np.ndarray) -> np.ndarray:
    return normalized_entropy(torch.as_tensor(probs)).numpy()


def uncertainty_scores(outputs: dict, temperature: float) -> dict[str, np.ndarray]:
    """Candidate per-image uncertainty scores (higher: less certain) from :func:`ablate.predict_split` outputs."""
    views = softmax(outputs["views_logits"], temperature)  # (V, N, C)
    single, averaged = views[0], views.mean(axis=0)
    seg_disagreement = np.array([mask_disagreement(torch.as_tensor(a), torch.as_tensor(b))
                                 for a, b in zip(outputs["views_seg"][0], outputs["views_seg"][-1])])  # fmt: skip
    return {
        "entropy": _entropy(single),
        "one_minus_max_probability": 1.0 - single.max(axis=1),
        "entropy_flip_tta": _entropy(averaged),
        "flip_disagreement_class": np.abs(views[0] - views[-1]).sum(axis=1) / 2,
        "flip_disagreement_segmentation": seg_disagreement,
        "entropy_flip_tta_plus_segmentation": (_entropy(averaged) + seg_disagreement) / 2,
    }


def image_errors(outputs: dict, temperature: float, malignant_threshold: float | None) -> dict[str, np.ndarray]:
    """Per image, for the shipped decision (one view, calibrated, the malignant operating point): true class,
    predicted class, whether it is wrong, and lesion Dice of the label map (NaN for normal images)."""
    from scripts.transforms import decide_class

    probs = softmax(outputs["views_logits"][0], temperature)
    labels = ablate.image_classes(outputs["label"])
    predicted = np.array([decide_class(torch.as_tensor(p), None, malignant_threshold) for p in probs])
    shipped = (outputs["views_seg"][0] > 0.5) & (predicted != 0)[:, None, None]
    dice = np.array([lesion_dice_iou(p, y)[0] if y.any() else np.nan for p, y in zip(shipped, outputs["label"])])
    return {"labels": labels, "predicted": predicted, "wrong": predicted != labels, "dice": dice}


def augmented_predictions(dataset_dir: str, ckpt: str, overrides: dict, repeats: int = 2) -> dict[str, np.ndarray]:
    """Embeddings and class log-probabilities of the validation images under the training augmentation
    (scanner-like changes of resolution, speckle, gain, contrast, geometry), ``repeats`` draws each: breast
    ultrasound that looks unlike BUSI must stay assessable, and its probabilities should not be over-confident.
    The images come in the order of the validation split, draw after draw."""
    from monai.utils import set_determinism

    set_determinism(0)
    parser = ablate._parser(dataset_dir, {**overrides, "validate#split": "validation"})
    items = parser.get_parsed_content("validate#datalist")()
    augment = parser.get_parsed_content("train#preprocessing")
    network = ablate.load_network(parser, ckpt).eval()
    network.return_embedding = True
    embeddings, log_probs = [], []
    with torch.no_grad():
        for _ in range(repeats):
            for item in items:
                out = network(augment(dict(item))["image"].as_tensor()[None].float())
                embeddings.append(out["embedding"][0].numpy())
                log_probs.append(torch.log_softmax(out["cls"][0].float(), dim=0).numpy())
    return {"embedding": np.stack(embeddings), "log_probs": np.stack(log_probs)}


def sensitivity_alternatives(
    probs: dict[str, np.ndarray], labels: dict[str, np.ndarray], targets: tuple[float, ...] = (0.9, 0.95, 1.0)
) -> list[dict]:
    """Malignant thresholds for several recall targets, each chosen on ``probs["validation"]``, with the malignant
    recall and benign specificity they give on every split in ``probs`` (calibrated ``(N, 3)`` probabilities): what a
    site that must miss fewer cancers pays for a lower ``malignant_threshold``. Only the validation rows choose."""
    rows = []
    for target in targets:
        threshold = ablate.malignant_operating_point(probs["validation"], labels["validation"], target)["threshold"]
        row: dict = {"sensitivity_target": target, "threshold": threshold}
        row.update({split: ablate.rates_at_threshold(p, labels[split], threshold) for split, p in probs.items()})
        rows.append(row)
    return rows


def ece_sampling_floor(probs: np.ndarray, draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """ECE of a perfectly calibrated model on a sample of this size: labels drawn from ``probs`` themselves.

    With about a hundred images and 15 bins the estimator is biased upwards; this is the ECE that calibration
    alone cannot remove.
    """
    rng = np.random.default_rng(seed)
    cumulative = probs.cumsum(axis=1)
    values = []
    for _ in range(draws):
        labels = (rng.random((len(probs), 1)) > cumulative).sum(axis=1).clip(max=probs.shape[1] - 1)
        values.append(expected_calibration_error(probs, labels)[0])
    return {"mean": float(np.mean(values)), "p95": float(np.quantile(values, 0.95))}


def rank_errors(scores: np.ndarray, errors: dict, defer: float = 0.1) -> dict[str, float]:
    """How well a score ranks mistakes, and the accuracy left after deferring the most uncertain ``defer`` share."""
    lesion = ~np.isnan(errors["dice"])
    kept = np.argsort(scores, kind="stable")[: int(round(len(scores) * (1 - defer)))]
    return {
        "auroc_misclassified": auroc(scores, errors["wrong"]),
        "auroc_dice_below_0.5": auroc(scores[lesion], errors["dice"][lesion] < 0.5),
        "accuracy": float(1 - errors["wrong"].mean()),
        f"accuracy_after_deferring_{int(defer * 100)}pct": float(1 - errors["wrong"][kept].mean()),
    }


def embedding_statistics(embeddings: np.ndarray, shrinkage: float) -> dict[str, torch.Tensor]:
    """Mean and precision matrix of embeddings, the covariance shrunk towards its mean variance (``shrinkage``)."""
    x = torch.as_tensor(embeddings, dtype=torch.float64)
    mean = x.mean(dim=0)
    covariance = torch.cov(x.T)
    target = torch.eye(len(mean), dtype=torch.float64) * covariance.diagonal().mean()
    precision = torch.linalg.inv((1 - shrinkage) * covariance + shrinkage * target)
    return {"mean": mean.float(), "precision": precision.float()}


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return image[..., :3].mean(axis=-1) if image.ndim == 3 else image


def write_outlier_images(folder: Path) -> list[tuple[str, Path]]:
    """Images that are not breast ultrasound, as files: blank, noise, photographs, other modalities.

    Returns:
        ``(kind, path)`` per image.
    """
    import nibabel
    import pydicom
    import skimage
    from PIL import Image

    rng = np.random.default_rng(0)
    images: list[tuple[str, str, np.ndarray]] = [
        ("blank", "black_400x500", np.zeros((400, 500))),
        ("blank", "white_400x500", np.full((400, 500), 255)),
        ("blank", "grey_3x3", np.full((3, 3), 128)),
        ("blank", "grey_300x300", np.full((300, 300), 90)),
        ("blank", "grey_with_faint_noise", np.clip(100 + rng.normal(0, 1.5, (400, 500)), 0, 255)),
    ]
    for index in range(3):
        size = (360 + 40 * index, 480 + 30 * index)
        images += [("noise", f"gaussian_noise_{index}", np.clip(rng.normal(128, 40 + 10 * index, size), 0, 255)),
                   ("noise", f"uniform_noise_{index}", rng.uniform(0, 255, size)),
                   ("noise", f"salt_and_pepper_{index}", 255.0 * (rng.random(size) < 0.1 + 0.1 * index)),
                   ("noise", f"smooth_noise_{index}", 255 * skimage.filters.gaussian(rng.random(size), sigma=4 + 4 *
                                                                                     index, preserve_range=False))]
    data = Path(skimage.data.__file__).parent
    photos = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png", "coins.png",
              "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "logo.png", "moon.png", "page.png",
              "rocket.jpg", "text.png", "motorcycle_left.png", "color.png", "chessboard_GRAY.png")
    microscopy = ("cell.png", "ihc.png")
    for name in photos + microscopy + ("microaneurysms.png", "retina.jpg", "phantom.png"):
        kind = "photograph" if name in photos else "microscopy" if name in microscopy else "other modality"
        images.append((kind, f"skimage_{Path(name).stem}", _grey(skimage.io.imread(data / name)).astype(float)))
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for kind, name, array in images:
        path = folder / f"{name}.png"
        scaled = array if array.max() <= 255 and array.min() >= 0 else 255 * (array - array.min()) / np.ptp(array)
        Image.fromarray(np.asarray(scaled).astype(np.uint8)).save(path)
        paths.append((kind, path))
    dicom = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(dicom / name, folder / name)
        paths.append(("other modality", folder / name))
    nifti = Path(nibabel.__file__).parent / "tests" / "data"
    volume = np.asarray(nibabel.load(nifti / "anatomical.nii").dataobj, dtype=np.float32)
    for axis in range(3):
        middle = np.take(volume, volume.shape[axis] // 2, axis=axis)[..., None]
        path = folder / f"nibabel_anatomical_axis{axis}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(middle, np.eye(4)), str(path))
        paths.append(("other modality", path))
    return paths


def inference_pass(paths: list[Path], ckpt: Path) -> dict[str, np.ndarray]:
    """The inference workflow's preprocessing and network on files: input problems, embeddings, probabilities."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["ckpt_path"] = str(ckpt)  # the network takes as many members as the checkpoint holds
    preprocessing = parser.get_parsed_content("preprocessing")
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    network.return_embedding = True
    problems, embeddings, probs = [], [], []
    with torch.no_grad():
        for path in paths:
            item = preprocessing({"image": str(path)})
            problems.append(item.get("input_problem", ""))
            out = network(item["image"].as_tensor()[None])
            embeddings.append(out["embedding"][0].numpy())
            probs.append(torch.softmax(out["cls"][0], dim=0).numpy())
    return {"problem": np.array(problems), "embedding": np.stack(embeddings), "probs": np.stack(probs)}


def _reliability_diagram(tables: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), squeeze=False)
    for ax, (title, table) in zip(axes[0], tables.items()):
        centres = [(b["low"] + b["high"]) / 2 for b in table]
        ax.bar(centres, [b["accuracy"] for b in table], width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], "ro", ms=4, label="bin mean")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy", title=title)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _set_config_values(values: dict[str, object]) -> None:
    for name in ("inference.json", "evaluate.json"):
        path = CONFIGS / name
        config = json.loads(path.read_text())
        changed = {key: value for key, value in values.items() if key in config}
        if changed:
            config.update(changed)
            path.write_text(json.dumps(config, indent=4) + "\n")


def main(
    dataset_dir: str,
    ckpt: str = str(BUNDLE / "models" / "model.pt"),
    image_size: int | None = None,
    shrinkage: float = 0.3,
    quantile: float = 0.99,
    sensitivity: float = 0.9,
    threshold_rule: str = "validation_and_augmented",
    amp: bool | str = False,
    write: bool = True,
) -> dict:
    """Fit on validation, score on test once, write the statistics, config values and measurements.

    Args:
        dataset_dir: the BUSI folder.
        ckpt: the weights to calibrate.
        image_size: the network input size the weights were trained at (default: ``train.json``'s).
        shrinkage: covariance shrinkage of the embedding statistics.
        quantile: share of the validation images, as they are and under the training augmentation (two draws
            each), that stays below the embedding distance threshold.
        sensitivity: malignant recall the malignant decision threshold must reach on validation (calibrated
            probabilities).
        threshold_rule: the validation images that threshold is chosen on (``ablate.threshold_images``): as they
            are (``validation``, up to 0.5.0), their augmented draws (``augmented_validation``) or both
            (``validation_and_augmented``, since 0.5.1: it kept more held-out cancers in cross-validation,
            ``weights/README.md``).
        amp: the bundle's ``amp`` for the split predictions; float32 by default, so that what is fitted does not
            depend on the CPU (``"auto"`` may choose bf16 where it is faster; the augmented and outlier passes are
            float32 anyway).
        write: write the statistics, the configs and the docs (``False``: print only).
    """
    if threshold_rule not in ablate.THRESHOLD_RULES:
        raise ValueError(f"unknown threshold_rule {threshold_rule!r}: expected one of {ablate.THRESHOLD_RULES}")
    overrides = {"amp": amp, **({"image_size": [image_size, image_size]} if image_size else {})}
    splits = {split: ablate.predict_split(dataset_dir, ckpt, overrides, split, tta=True)
              for split in ("training", "validation", "test")}  # fmt: skip
    val, test = splits["validation"], splits["test"]
    val_labels, test_labels = ablate.image_classes(val["label"]), ablate.image_classes(test["label"])
    augmented = augmented_predictions(dataset_dir, ckpt, overrides)
    augmented["label"] = np.tile(val_labels, len(augmented["log_probs"]) // len(val_labels))
    # fitted on validation as it is and under scanner-like augmentation: other scanners make the model less
    # accurate than on BUSI validation, and one temperature fitted on clean validation alone stays over-confident
    temperature = fit_temperature(np.r_[val["views_logits"][0], augmented["log_probs"]],
                                  np.r_[val_labels, augmented["label"]])  # fmt: skip
    calibration = {"fitted_on": "validation + 2 augmented draws of validation",
                   "validation_only_temperature": fit_temperature(val["views_logits"][0], val_labels)}  # fmt: skip
    tables = {}
    for name, t in (("before", 1.0), ("validation_only", calibration["validation_only_temperature"]),
                    ("after", temperature)):  # fmt: skip
        ece, table = expected_calibration_error(softmax(test["views_logits"][0], t), test_labels)
        val_ece, _ = expected_calibration_error(softmax(val["views_logits"][0], t), val_labels)
        aug_ece, _ = expected_calibration_error(softmax(augmented["log_probs"], t), augmented["label"])
        calibration[name] = {"temperature": t, "test_ece": ece, "validation_ece": val_ece,
                             "augmented_validation_ece": aug_ece,
                             "test_ece_of_a_perfectly_calibrated_model": ece_sampling_floor(
                                 softmax(test["views_logits"][0], t))}  # fmt: skip
        if name != "validation_only":
            tables[f"test, {'uncalibrated' if t == 1.0 else f'temperature {t:.2f}'} (ECE {ece:.3f})"] = table

    single = {split: {"seg": o["views_seg"][0], "cls": softmax(o["views_logits"][0], temperature), "label": o["label"]}
              for split, o in (("validation", val), ("test", test))}  # fmt: skip
    flipped = {split: {"seg": o["seg"], "cls": softmax(o["views_logits"], temperature).mean(axis=0),
                       "label": o["label"]} for split, o in (("validation", val), ("test", test))}  # fmt: skip
    augmented_probs = softmax(augmented["log_probs"], temperature)
    rule_thresholds = {rule: ablate.malignant_operating_point(*ablate.threshold_images(
        rule, single["validation"]["cls"], val_labels, augmented_probs, augmented["label"]), sensitivity)["threshold"]
        for rule in ablate.THRESHOLD_RULES}  # fmt: skip
    malignant_threshold = rule_thresholds[threshold_rule]
    point = {**ablate.malignant_operating_point(single["validation"]["cls"], val_labels, sensitivity),
             **ablate.rates_at_threshold(single["validation"]["cls"], val_labels, malignant_threshold)}  # fmt: skip
    test_point = ablate.malignant_operating_point(single["test"]["cls"], test_labels, sensitivity)
    operating_point = {
        "sensitivity_target": sensitivity, "threshold_rule": threshold_rule, "threshold": malignant_threshold,
        "validation": {k: point[k] for k in ("sensitivity", "specificity", "benign_malignant_auc")},
        "test": {**ablate.rates_at_threshold(single["test"]["cls"], test_labels, malignant_threshold),
                 "benign_malignant_auc": test_point["benign_malignant_auc"]},
        "scores": {f"{split}_{mode}": ablate.score(outputs, malignant_threshold=t)
                   for split in ("validation", "test")
                   for mode, outputs, t in (("arg_max", single[split], None),
                                            ("operating_point", single[split], malignant_threshold),
                                            ("flip_tta_arg_max", flipped[split], None))},
    }  # fmt: skip
    split_probs = {"validation": single["validation"]["cls"], "augmented_validation": augmented_probs,
                   "test": single["test"]["cls"]}  # fmt: skip
    split_labels = {"validation": val_labels, "augmented_validation": augmented["label"], "test": test_labels}
    operating_point["alternatives"] = sensitivity_alternatives(split_probs, split_labels)
    # every rule's threshold, for the record: cross_validate.thresholds chose between them on held-out folds
    operating_point["rules"] = {
        rule: {"threshold": t, **{split: ablate.rates_at_threshold(p, split_labels[split], t)
                                  for split, p in split_probs.items()}}
        for rule, t in rule_thresholds.items()
    }  # fmt: skip
    uncertainty: dict = {}
    for split, outputs in (("validation", val), ("test", test)):
        errors = image_errors(outputs, temperature, malignant_threshold)
        for name, scores in uncertainty_scores(outputs, temperature).items():
            uncertainty.setdefault(name, {})[split] = rank_errors(scores, errors)
    chosen = max(uncertainty, key=lambda name: uncertainty[name]["validation"]["auroc_misclassified"]
                 + uncertainty[name]["validation"]["auroc_dice_below_0.5"])  # fmt: skip
    uncertainty = {"chosen_on_validation": chosen, "candidates": uncertainty}

    stats = embedding_statistics(splits["training"]["embedding"], shrinkage)
    distance = {split: mahalanobis_distance(torch.as_tensor(splits[split]["embedding"]), *stats.values()).numpy()
                for split in splits}  # fmt: skip
    augmented = mahalanobis_distance(torch.as_tensor(augmented["embedding"]), *stats.values()).numpy()
    threshold = float(np.quantile(np.r_[distance["validation"], augmented], quantile))
    with tempfile.TemporaryDirectory() as tmp:
        outliers = write_outlier_images(Path(tmp))
        started = time.perf_counter()
        passed = inference_pass([path for _, path in outliers] + [Path(p) for p in test["images"]], Path(ckpt))
        seconds = time.perf_counter() - started
    outlier_distance = mahalanobis_distance(torch.as_tensor(passed["embedding"]), *stats.values()).numpy()
    flagged_by_check = passed["problem"] != ""
    score = np.where(flagged_by_check, np.inf, outlier_distance)
    n_out = len(outliers)
    is_outlier = np.r_[np.ones(n_out, bool), np.zeros(len(test["images"]), bool)]
    flagged = score > threshold
    kinds = sorted({kind for kind, _ in outliers})
    photo_index = np.cumsum([kind == "photograph" for kind, _ in outliers])
    # the feature (stage, statistics) and the shrinkage were chosen on this half of the outliers
    selection = np.array([kind == "noise" or (kind == "photograph" and photo_index[i] % 2 == 1)
                          for i, (kind, _) in enumerate(outliers)])  # fmt: skip
    ood = {
        "shrinkage": shrinkage, "quantile": quantile, "threshold": threshold,
        "auroc": auroc(np.nan_to_num(score, posinf=1e9), is_outlier),
        "auroc_distance_only": auroc(outlier_distance, is_outlier),
        "auroc_selection_half": auroc(np.r_[score[:n_out][selection], score[n_out:]], np.r_[
            np.ones(selection.sum(), bool), np.zeros(len(test["images"]), bool)]),
        "auroc_held_out_half": auroc(np.r_[score[:n_out][~selection], score[n_out:]], np.r_[
            np.ones((~selection).sum(), bool), np.zeros(len(test["images"]), bool)]),
        "busi_test_flagged": float(flagged[n_out:].mean()),
        "augmented_validation_flagged": float((augmented > threshold).mean()),
        "busi_validation_flagged": float((distance["validation"] > threshold).mean()),
        "outliers_flagged": float(flagged[:n_out].mean()),
        "per_kind_flagged": {k: f"{int(sum(f for (kk, _), f in zip(outliers, flagged) if kk == k))}/"
                                f"{sum(kk == k for kk, _ in outliers)}" for k in kinds},
        "per_image": [{"kind": kind, "image": path.name, "selection": bool(chosen_on), "input_problem": str(problem),
                       "distance": float(d), "flagged": bool(f), "p_malignant": float(p[2])}
                      for (kind, path), problem, d, f, p, chosen_on in zip(
                          outliers, passed["problem"], outlier_distance, flagged, passed["probs"], selection)],
        "busi_distance_quantiles": {split: [float(np.quantile(values, q)) for q in (0.5, 0.9, 0.99, 1.0)]
                                    for split, values in {**distance, "augmented_validation": augmented}.items()},
        "seconds_per_image_inference_pass": seconds / len(is_outlier),
    }  # fmt: skip
    result = {"ckpt_sha256": hashlib.sha256(Path(ckpt).read_bytes()).hexdigest(), "calibration": calibration,
              "malignant_operating_point": operating_point, "uncertainty": uncertainty,
              "out_of_distribution": ood}  # fmt: skip
    print(json.dumps({k: v for k, v in result.items()}, indent=1, default=float)[:20000])
    if write:
        torch.save({**stats, "ckpt_sha256": result["ckpt_sha256"]}, STATS_FILE)
        _set_config_values({"cls_temperature": round(temperature, 4), "max_embedding_distance": round(threshold, 2),
                            "malignant_threshold": math.floor(malignant_threshold * 1e4) / 1e4})
        (DOCS / "calibration.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
        _reliability_diagram(tables, DOCS / "test_reliability_diagram.png")
    return result


if __name__ == "__main__":
    fire.Fire(main)
