"""Ablations of the training recipe on the validation split, at one small budget, side by side.

Each variant trains ``bundle/configs/train.json`` with a few overrides (its own process, one OpenMP thread, two
variants at a time on a 2-core machine), then its last-epoch weights are scored on the validation split. Every
variant gets the same budget (image size, epochs, schedule), and all are scored from the last epoch, so no
variant profits from model selection on the split it is scored on.

Scores per variant:

- ``dice_seg``: lesion Dice of the segmentation head alone (lesion = background probability < 0.5);
- ``dice``: lesion Dice of the shipped label map, which is emptied when the image is classified normal;
- ``normal_fp``: share of normal images whose shipped label map is not empty;
- ``accuracy``, ``macro_f1``, ``macro_auc`` of the classification head;
- ``benign_malignant_auc`` of ``p(malignant)`` between benign and malignant images, and ``specificity_at_0.9_recall``,
  the benign specificity of the highest threshold that finds 90 % of the cancers: the threshold-free view of the
  shipped malignant operating point, which is chosen on validation;
- ``score``: (``dice`` + ``macro_f1``) / 2, the training's checkpoint-selection score.

Usage::

    python tools/ablate.py run --dataset_dir ../shared/data/Dataset_BUSI_with_GT --out runs/ablation
    python tools/ablate.py report --out runs/ablation      # markdown table of mean and spread over seeds
    python tools/ablate.py evaluate --dataset_dir ... --ckpt bundle/models/model.pt --image_size 256 --tta true
    python tools/ablate.py sweep --dataset_dir ... --ckpt bundle/models/model.pt   # post-processing choices
    python tools/ablate.py ensemble --dataset_dir ... --ckpts "['a/model.pt','b/model.pt']"  # members and their mean
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable, Sequence

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
TRAIN_CONFIG = BUNDLE / "configs" / "train.json"
for _path in (BUNDLE, REPO / "tools"):  # the bundle's scripts; prepare_datalist.py beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from prepare_datalist import create_datalist  # noqa: E402

from scripts.inferers import decide_autocast  # noqa: E402


def _light_augmentation() -> list:
    """The training augmentation without its intensity transforms (geometry only: affine and flip)."""
    transforms = json.loads(TRAIN_CONFIG.read_text())["train"]["random_transforms"]
    return [t for t in transforms if t["_target_"] in ("RandAffined", "RandFlipd")]


def _augmentation_0_2() -> list:
    """The augmentation of bundle version 0.2.0: no low-resolution, speckle or depth-gain transforms, smaller
    scale range, 20-pixel translations."""
    added = ("RandSimulateLowResolutiond", "scripts.transforms.RandSpeckleNoised",
             "scripts.transforms.RandDepthAttenuationd")  # fmt: skip
    transforms = json.loads(TRAIN_CONFIG.read_text())["train"]["random_transforms"]
    kept = [t for t in transforms if t["_target_"] not in added]
    for transform in kept:
        if transform["_target_"] == "RandAffined":
            transform.update(scale_range=[0.15, 0.15], translate_range=[20, 20])
    return kept


PRETRAINED_ENCODER = {"network_def#encoder": "efficientnet-lite0", "network_def#pretrained": True}
# the residual encoder trained from scratch (the network of versions 0.1.0 and 0.2.0)
SCRATCH_ENCODER = {"network_def#encoder": "residual", "network_def#pretrained": False,
                   "network_def#channels": [16, 32, 64, 128, 256], "network_def#strides": [2, 2, 2, 2, 2],
                   "network_def#num_res_units": 2}  # fmt: skip


def _with_ema(half_life_epochs: float = 2.0, steps_per_epoch: int = 34) -> dict:
    """Overrides that keep an exponential moving average of the weights (ignite's ``EMAHandler``, buffers averaged
    too) beside the trained ones and save it in ``checkpoint.pt`` as ``ema_model``, so that one run scores both.

    The validator and the best-model selection still see the trained weights."""
    handlers = json.loads(TRAIN_CONFIG.read_text())["train"]["handlers"]
    for handler in handlers:
        if handler["_target_"] == "scripts.handlers.TrainingCheckpoint":
            handler["save_dict"]["ema_model"] = "$@ema_handler.ema_model"
    momentum = 1.0 - 0.5 ** (1.0 / (half_life_epochs * steps_per_epoch))
    ema_handler = {"_target_": "ignite.handlers.EMAHandler", "model": "@network", "momentum": momentum,
                   "handle_buffers": "update"}  # fmt: skip
    return {"ema_handler": ema_handler, "train#handlers": handlers + ["@ema_handler"]}


# name -> overrides of train.json; seeds are added by ``run``
RECIPE_0_2 = {"class_balance": 0.0, "train#random_transforms": "0.2", **SCRATCH_ENCODER}
VARIANTS: dict[str, dict] = {
    "recipe_0.2": RECIPE_0_2,
    "recipe_0.3_scratch": SCRATCH_ENCODER,
    "recipe_0.3_pretrained": PRETRAINED_ENCODER,
    "ema": {**PRETRAINED_ENCODER, **_with_ema()},
    # segmentation_models_pytorch's default U-Net decoder widths, against the shipped 128-64-32-16-16
    "wide_decoder": {**PRETRAINED_ENCODER, "network_def#decoder_channels": [256, 128, 64, 32, 16]},
    # the ablations of version 0.2.0, on its recipe
    "multitask": RECIPE_0_2,
    "segmentation_only": {**RECIPE_0_2, "loss_beta": 0.0},
    "classification_only": {**RECIPE_0_2, "loss_alpha": 0.0},
    "no_denoising": {**RECIPE_0_2, "median_radius": 0},
    "beta_1.0": {**RECIPE_0_2, "loss_beta": 1.0},
    "beta_0.2": {**RECIPE_0_2, "loss_beta": 0.2},
    "class_weighted_ce": {**RECIPE_0_2, "loss#class_weights": [1.6, 0.5, 1.0]},
    "geometric_augmentation_only": {**SCRATCH_ENCODER, "train#random_transforms": "light"},
}
SEEDED = ("recipe_0.2", "recipe_0.3_scratch", "recipe_0.3_pretrained", "ema", "wide_decoder",
          "multitask", "segmentation_only", "classification_only")


def _budget(image_size: int, epochs: int) -> dict:
    return {
        "image_size": [image_size, image_size],
        "max_epochs": epochs,
        "early_stop_patience": epochs + 1,
        "num_workers": 0,
    }


def _resolve(overrides: dict) -> dict:
    resolved = dict(overrides)
    if resolved.get("train#random_transforms") == "light":
        resolved["train#random_transforms"] = _light_augmentation()
    if resolved.get("train#random_transforms") == "0.2":
        resolved["train#random_transforms"] = _augmentation_0_2()
    return resolved


def _parser(dataset_dir: str, overrides: dict):
    """train.json for ``dataset_dir`` with ``overrides``; its datalist is made first where missing."""
    from monai.bundle import ConfigParser

    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser["bundle_root"] = str(BUNDLE)
    parser["dataset_dir"] = dataset_dir
    for key, value in _resolve(overrides).items():
        parser[key] = copy.deepcopy(value)
    datalist = parser.get_parsed_content("datalist")
    if not Path(datalist).is_file():  # BUSI's split is committed; another folder's is made once
        create_datalist(dataset_dir, datalist)
    return parser


def load_network(parser, ckpt: str, weights: str = "model") -> torch.nn.Module:
    """``network_def`` of ``parser`` with the weights ``ckpt[weights]``: one network, or an ensemble of such networks
    (``scripts.net.MultiTaskEnsemble``) where the checkpoint holds several."""
    from scripts.handlers import load_checkpoint
    from scripts.net import MultiTaskEnsemble, ensemble_members

    def member(return_embedding: bool = False) -> torch.nn.Module:
        network = parser.get_parsed_content("network_def", lazy=False)
        network.return_embedding = return_embedding
        return network

    state = load_checkpoint(ckpt)[weights]
    members = ensemble_members(state)
    network = member() if members == 1 else MultiTaskEnsemble(member, members)
    network.load_state_dict(state)
    return network


def predict_split(
    dataset_dir: str,
    ckpt: str,
    overrides: dict,
    split: str = "validation",
    tta: bool = False,
    weights: str = "model",
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Probabilities of a checkpoint on one split of the datalist.

    Args:
        dataset_dir: the BUSI folder.
        ckpt: ``model.pt`` (``{"model": state_dict}``) or ``checkpoint.pt`` (its ``"model"`` entry is used).
        overrides: train.json overrides the checkpoint was trained with (image size, network).
        split: datalist split.
        tta: also predict the horizontally flipped image and average the probabilities.
        weights: the checkpoint entry to load (``ema_model``: the moving average of the weights).
        device: where the network runs (``cuda`` where there is one); the outputs come back on the CPU.

    Returns:
        ``seg`` lesion probability ``(N, H, W)``, ``cls`` class probabilities ``(N, 3)``, ``label`` label maps
        ``(N, H, W)``; per view (``V`` = 2 with ``tta``, else 1): ``views_seg`` ``(V, N, H, W)``, ``views_logits``
        class log-probabilities ``(V, N, 3)``; ``embedding`` pooled bottleneck of the unflipped image ``(N, D)``.
    """
    return predict_split_checkpoints(dataset_dir, [ckpt], overrides, split, tta, weights, device)[0]


@torch.no_grad()
def predict_split_checkpoints(
    dataset_dir: str,
    ckpts: Sequence[str],
    overrides: dict,
    split: str = "validation",
    tta: bool = False,
    weights: str = "model",
    device: str = "cpu",
) -> list[dict[str, np.ndarray]]:
    """:func:`predict_split` of several checkpoints of one ``network_def`` (e.g. seeds), preprocessing each image
    once for all of them.

    Returns:
        one :func:`predict_split` result per checkpoint, in the order of ``ckpts``.
    """
    parser = _parser(dataset_dir, {**overrides, "validate#split": split})
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    items = parser.get_parsed_content("validate#datalist")()
    networks = []
    for ckpt in ckpts:
        network = load_network(parser, ckpt, weights)
        network.eval().to(device, memory_format=torch.channels_last)
        network.return_embedding = True
        networks.append(network)
    device_type = torch.device(device).type
    autocast = None  # decided at the first batch, as the bundle's inferer decides it
    per_network = [{"seg": [], "logits": [], "embedding": []} for _ in networks]
    labels = []
    for start in range(0, len(items), 16):
        batch = [preprocessing(item) for item in items[start : start + 16]]
        images = torch.stack([b["image"].as_tensor() for b in batch]).to(device)
        images = images.contiguous(memory_format=torch.channels_last)
        views = [images, images.flip(2)] if tta else [images]
        if autocast is None:
            autocast = decide_autocast(parser["amp"], networks[0], images)[0]
        labels += [b["label"].as_tensor()[0] for b in batch]
        for network, collected in zip(networks, per_network):
            seg, logits = [], []
            for index, view in enumerate(views):
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                    out = network(view)
                seg_prob = 1.0 - torch.softmax(out["pred"].float(), dim=1)[:, 0].cpu()
                seg.append(seg_prob.flip(1) if index == 1 else seg_prob)
                logits.append(torch.log_softmax(out["cls"].float(), dim=1).cpu())
                if index == 0:
                    collected["embedding"].append(out["embedding"].float().cpu())
            collected["seg"].append(torch.stack(seg))
            collected["logits"].append(torch.stack(logits))
    label_maps = torch.stack(labels).numpy()
    results = []
    for collected in per_network:
        seg_all, logits_all = torch.cat(collected["seg"], dim=1), torch.cat(collected["logits"], dim=1)
        results.append({
            "seg": seg_all.mean(0).numpy(),
            "cls": logits_all.exp().mean(0).numpy(),
            "label": label_maps,
            "views_seg": seg_all.numpy(),
            "views_logits": logits_all.numpy(),
            "embedding": torch.cat(collected["embedding"]).numpy(),
            "images": [str(item["image"]) for item in items],
        })  # fmt: skip
    return results


def image_classes(label_maps: np.ndarray) -> np.ndarray:
    """The image class of each label map ``(N, H, W)``: its highest label (0 normal, 1 benign, 2 malignant)."""
    return label_maps.reshape(len(label_maps), -1).max(axis=1)


def score(
    outputs: dict[str, np.ndarray],
    normal_threshold: float | None = None,
    lesion_threshold: float = 0.5,
    malignant_threshold: float | None = None,
    map_cleanup: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Validation scores of predicted probabilities (see the module docstring).

    Args:
        outputs: from :func:`predict_split`.
        normal_threshold: call an image normal (and empty its label map) only where ``p(normal)`` exceeds this,
            otherwise the likelier of benign and malignant; ``None``: the arg-max class.
        lesion_threshold: a pixel is lesion where its lesion probability exceeds this.
        malignant_threshold: call an image malignant where ``p(malignant)`` reaches this (see
            ``scripts.transforms.decide_class``).
        map_cleanup: applied to each shipped (class-gated) binary lesion map ``(1, H, W)``, e.g. MONAI's
            ``KeepLargestConnectedComponent``; ``None``: the maps as they are.
    """
    from scripts.metrics import classification_metrics, lesion_dice_iou
    from scripts.transforms import decide_class

    lesion = outputs["seg"] > lesion_threshold
    label = outputs["label"]
    probs = outputs["cls"]
    labels = image_classes(label)
    preds = np.array([decide_class(torch.as_tensor(p), normal_threshold, malignant_threshold) for p in probs])
    shipped = lesion & (preds != 0)[:, None, None]
    if map_cleanup is not None:
        shipped = np.stack([np.asarray(map_cleanup(torch.as_tensor(m[None]))[0]) > 0 for m in shipped])
    has = labels > 0
    dice_seg = [lesion_dice_iou(p, y)[0] for p, y in zip(lesion[has], label[has])]
    dice_iou = [lesion_dice_iou(p, y) for p, y in zip(shipped[has], label[has])]
    metrics = classification_metrics(probs, preds, labels)
    high_recall = malignant_operating_point(probs, labels, sensitivity=0.9)
    dice = float(np.mean([d for d, _ in dice_iou]))
    return {
        "dice_seg": float(np.mean(dice_seg)),
        "dice": dice,
        "iou": float(np.mean([i for _, i in dice_iou])),
        "normal_fp": float(shipped[~has].reshape((~has).sum(), -1).any(axis=1).mean()),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "macro_auc": metrics["macro_auc"],
        "malignant_recall": metrics["per_class"]["malignant"]["recall"],
        "normal_recall": metrics["per_class"]["normal"]["recall"],
        "lesion_called_normal": float((preds[has] == 0).mean()),
        "benign_malignant_auc": high_recall["benign_malignant_auc"],
        "specificity_at_0.9_recall": high_recall["specificity"],
        "score": (dice + metrics["macro_f1"]) / 2,
    }


def augmented_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Benign / malignant and macro AUC of class probabilities on augmented draws (:func:`augmented_class_probs`)."""
    from scripts.metrics import classification_metrics

    return {
        "augmented_benign_malignant_auc": malignant_operating_point(probs, labels)["benign_malignant_auc"],
        "augmented_macro_auc": classification_metrics(probs, None, labels)["macro_auc"],
    }


def _train_command(dataset_dir: str, run_dir: Path, overrides: dict, seed: int) -> list[str]:
    args_file = run_dir / "overrides.json"
    args_file.write_text(json.dumps({**_resolve(overrides), "seed": seed}))
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN_CONFIG),
        "--bundle_root", str(BUNDLE), "--dataset_dir", dataset_dir, "--ckpt_dir", str(run_dir / "models"),
        "--output_dir", str(run_dir / "eval"), "--args_file", str(args_file),
    ]  # fmt: skip


class TrainingPool:
    """Trainings of ``train.json`` (:func:`_train_command`), each its own process writing its run folder's
    ``train.log``, at most ``parallel`` at a time.

    Args:
        dataset_dir: the BUSI folder.
        parallel: trainings at a time.
        threads: OpenMP threads per training.
        poll_s: seconds between checks for ended trainings.
    """

    def __init__(self, dataset_dir: str, parallel: int, threads: int = 1, poll_s: float = 5.0) -> None:
        self.dataset_dir, self.parallel, self.poll_s = dataset_dir, parallel, poll_s
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.running: dict[Path, tuple[subprocess.Popen, IO, float]] = {}
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the pool was made."""
        return time.perf_counter() - self.started

    def has_room(self) -> bool:
        """Whether fewer than ``parallel`` trainings run."""
        return len(self.running) < self.parallel

    def start(self, run_dir: Path, overrides: dict, seed: int, append_log: bool = False) -> None:
        """Start the training of ``run_dir`` (``append_log``: a resumed run's log goes on)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "train.log", "a" if append_log else "w")
        command = _train_command(self.dataset_dir, run_dir, overrides, seed)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.running[run_dir] = (process, log, time.perf_counter())
        print(f"{self.elapsed():6.0f} s started {run_dir.name}", flush=True)

    def wait(self) -> list[tuple[Path, int, float]]:
        """Sleep ``poll_s``, then collect the trainings that have ended.

        Returns:
            ``(run folder, exit code, seconds it ran)`` of each.
        """
        time.sleep(self.poll_s)
        ended = []
        for run_dir, (process, log, started) in list(self.running.items()):
            if process.poll() is None:
                continue
            log.close()
            del self.running[run_dir]
            ended.append((run_dir, process.returncode, time.perf_counter() - started))
            status = "done" if process.returncode == 0 else f"FAILED ({process.returncode}), see {run_dir}/train.log"
            print(f"{self.elapsed():6.0f} s {run_dir.name} {status}", flush=True)
        return ended

    def stop(self, run_dir: Path) -> None:
        """Terminate the training of ``run_dir``; :meth:`wait` collects it."""
        self.running[run_dir][0].terminate()


def run(
    dataset_dir: str,
    out: str = "runs/ablation",
    image_size: int = 128,
    epochs: int = 20,
    seeds: int = 2,
    parallel: int = 2,
    only: str | None = None,
) -> None:
    """Train every variant (``SEEDED`` ones with ``seeds`` seeds, the rest with seed 0), then score them.

    Args:
        dataset_dir: the BUSI folder.
        out: output folder; a finished variant (``scores.json`` present) is not run again.
        image_size: training and scoring size (square).
        epochs: training epochs of every variant.
        seeds: seeds of the variants in ``SEEDED``.
        parallel: trainings at a time, each with one OpenMP thread.
        only: comma-separated variant names to run.
    """
    budget = _budget(image_size, epochs)
    _parser(dataset_dir, {})  # the datalist the trainings read
    jobs = []
    for name, overrides in VARIANTS.items():
        if only and name not in only.split(","):
            continue
        for seed in range(seeds if name in SEEDED else 1):
            run_dir = Path(out) / f"{name}_seed{seed}"
            if not (run_dir / "scores.json").is_file():
                jobs.append((name, seed, run_dir, {**budget, **overrides}))
    pool, started = TrainingPool(dataset_dir, parallel), {}
    while jobs or pool.running:
        while jobs and pool.has_room():
            name, seed, run_dir, overrides = jobs.pop(0)
            pool.start(run_dir, overrides, seed)
            started[run_dir] = (name, seed, overrides)
        for run_dir, returncode, seconds in pool.wait():
            name, seed, overrides = started.pop(run_dir)
            if returncode != 0:
                continue
            outputs = predict_split(dataset_dir, str(run_dir / "models" / "checkpoint.pt"), overrides)
            result = {"variant": name, "seed": seed, "overrides": overrides, "train_s": seconds, **score(outputs)}
            if "ema_handler" in overrides:
                ema = predict_split(dataset_dir, str(run_dir / "models" / "checkpoint.pt"), overrides,
                                    weights="ema_model")  # fmt: skip
                result["ema"] = score(ema)
            (run_dir / "scores.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result), flush=True)


def rescore(dataset_dir: str, out: str = "runs/ablation") -> None:
    """Score every finished run of ``out`` again from its last-epoch checkpoint (after the scores gained keys).

    Args:
        dataset_dir: the BUSI folder.
        out: the folder of ``run``.
    """
    for path in sorted(Path(out).glob("*/scores.json")):
        result = json.loads(path.read_text())
        overrides = {**result["overrides"], **VARIANTS.get(result["variant"], {})}
        outputs = predict_split(dataset_dir, str(path.parent / "models" / "checkpoint.pt"), overrides)
        result.update(overrides=overrides, **score(outputs))
        path.write_text(json.dumps(result, indent=2))
        print(path.parent.name, json.dumps({k: round(v, 3) for k, v in score(outputs).items()}), flush=True)


def report(out: str = "runs/ablation") -> str:
    """Markdown table: mean ± sample standard deviation over seeds (and the seeds' range) of each score."""
    results: dict[str, list[dict]] = {}
    for path in sorted(Path(out).glob("*/scores.json")):
        result = json.loads(path.read_text())
        results.setdefault(result["variant"], []).append(result)
    keys = ("dice_seg", "dice", "normal_fp", "accuracy", "macro_f1", "macro_auc", "malignant_recall",
            "lesion_called_normal", "benign_malignant_auc", "specificity_at_0.9_recall")  # fmt: skip
    lines = ["| variant | seeds | " + " | ".join(keys) + " |", "| --- | ---: |" + " ---: |" * len(keys)]
    for name in VARIANTS:
        runs = results.get(name)
        if not runs:
            continue
        cells = []
        for key in keys:
            if any(key not in r for r in runs):
                cells.append("n/a")
                continue
            values = np.array([r[key] for r in runs])
            spread = f" ± {values.std(ddof=1):.3f} ({values.min():.3f}-{values.max():.3f})" if len(runs) > 1 else ""
            cells.append(f"{values.mean():.3f}{spread}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(
    dataset_dir: str,
    ckpt: str = str(BUNDLE / "models" / "model.pt"),
    split: str = "validation",
    image_size: int = 256,
    tta: bool = False,
    normal_threshold: float | None = None,
) -> dict[str, float]:
    """Scores of one checkpoint on one split (e.g. with and without test-time flipping).

    Args:
        dataset_dir: the BUSI folder.
        ckpt: checkpoint path.
        split: datalist split.
        image_size: network input size.
        tta: average with the flipped image.
        normal_threshold: see :func:`score`.
    """
    outputs = predict_split(dataset_dir, ckpt, {"image_size": [image_size, image_size]}, split, tta)
    result = score(outputs, normal_threshold)
    print(json.dumps(result))
    return result


def sweep(
    dataset_dir: str,
    ckpt: str = str(BUNDLE / "models" / "model.pt"),
    split: str = "validation",
    image_size: int = 256,
    malignant_thresholds: tuple = (None,),
) -> str:
    """Post-processing choices of one checkpoint side by side: test-time flipping, lesion and normal thresholds.

    Args:
        dataset_dir: the BUSI folder.
        ckpt: checkpoint path.
        split: datalist split (choose on ``validation``, never on ``test``).
        image_size: network input size.
        malignant_thresholds: malignant operating points to combine with the others (``None``: arg-max).

    Returns:
        A markdown table, one row per combination.
    """
    keys = ("dice_seg", "dice", "iou", "normal_fp", "accuracy", "macro_f1", "macro_auc", "malignant_recall",
            "lesion_called_normal")  # fmt: skip
    lines = ["| flip TTA | lesion threshold | normal threshold | malignant threshold | " + " | ".join(keys) + " |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(keys)]  # fmt: skip
    for tta in (False, True):
        outputs = predict_split(dataset_dir, ckpt, {"image_size": [image_size, image_size]}, split, tta)
        for lesion_threshold in (0.4, 0.5, 0.6):
            for normal_threshold in (None, 0.6, 0.7, 0.8):
                for malignant_threshold in malignant_thresholds:
                    result = score(outputs, normal_threshold, lesion_threshold, malignant_threshold)
                    lines.append(f"| {'yes' if tta else 'no'} | {lesion_threshold} | "
                                 f"{'arg-max' if normal_threshold is None else normal_threshold} | "
                                 f"{'arg-max' if malignant_threshold is None else malignant_threshold} | "
                                 + " | ".join(f"{result[k]:.3f}" for k in keys) + " |")  # fmt: skip
    return "\n".join(lines)


def rates_at_threshold(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Malignant recall (``sensitivity``) and benign images not called malignant (``specificity``) when an image
    is called malignant at ``p(malignant) >= threshold``; ``probs`` ``(N, 3)``, ``labels`` ``(N,)``."""
    malignant, benign = probs[labels == 2, 2], probs[labels == 1, 2]
    return {"sensitivity": float((malignant >= threshold).mean()), "specificity": float((benign < threshold).mean())}


def malignant_operating_point(probs: np.ndarray, labels: np.ndarray, sensitivity: float = 0.9) -> dict:
    """The highest ``p(malignant)`` threshold whose malignant recall reaches ``sensitivity``, and what it costs.

    Args:
        probs: class probabilities ``(N, 3)``.
        labels: true classes ``(N,)``.
        sensitivity: the malignant recall to reach.

    Returns:
        ``threshold``, ``sensitivity`` reached, ``specificity`` (benign images not called malignant),
        ``benign_malignant_auc`` (ROC AUC of ``p(malignant)``, benign vs malignant images) and the benign /
        malignant ROC points.
    """
    from monai.metrics import compute_roc_auc

    malignant, benign = probs[labels == 2, 2], probs[labels == 1, 2]
    # recall at threshold t is the share of malignant p >= t: the k-th largest reaches k / n
    ordered = np.sort(malignant)[::-1]
    needed = int(np.ceil(sensitivity * len(ordered) - 1e-9))
    threshold = float(ordered[max(needed, 1) - 1])
    scores = np.r_[benign, malignant]
    truth = np.r_[np.zeros(len(benign)), np.ones(len(malignant))]
    roc = [(float((benign >= x).mean()), float((malignant >= x).mean())) for x in np.unique(scores)[::-1]]
    return {
        "threshold": threshold,
        **rates_at_threshold(probs, labels, threshold),
        "benign_malignant_auc": float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(truth))),
        "roc_fpr_tpr": roc,
    }


THRESHOLD_RULES = ("validation", "augmented_validation", "validation_and_augmented")


def threshold_images(
    rule: str, probs: np.ndarray, labels: np.ndarray, augmented_probs: np.ndarray, augmented_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The images a malignant threshold rule chooses its threshold on (:func:`malignant_operating_point`).

    Args:
        rule: ``validation`` (the images as they are), ``augmented_validation`` (their draws under the training
            augmentation) or ``validation_and_augmented`` (both together).
        probs: class probabilities ``(N, 3)`` of the validation images.
        labels: their true classes ``(N,)``.
        augmented_probs: class probabilities ``(M, 3)`` of their augmented draws.
        augmented_labels: the draws' true classes ``(M,)``.

    Returns:
        ``(probabilities, classes)`` of the chosen images.
    """
    choices = {
        "validation": (probs, labels),
        "augmented_validation": (augmented_probs, augmented_labels),
        "validation_and_augmented": (np.concatenate([probs, augmented_probs]), np.r_[labels, augmented_labels]),
    }
    if rule not in choices:
        raise ValueError(f"unknown threshold rule {rule!r}: expected one of {THRESHOLD_RULES}")
    return choices[rule]


def operating_point(
    dataset_dir: str,
    ckpt: str = str(BUNDLE / "models" / "model.pt"),
    split: str = "validation",
    image_size: int = 256,
    sensitivity: float = 0.9,
    threshold: float | None = None,
    overrides: str | dict | None = None,
    temperature: float = 1.0,
) -> dict:
    """Choose the malignant threshold on ``validation`` (or, with ``threshold``, score a chosen one on a split).

    Args:
        dataset_dir: the BUSI folder.
        ckpt: checkpoint path.
        split: datalist split.
        image_size: network input size.
        sensitivity: the malignant recall the threshold must reach (choosing).
        threshold: a threshold chosen before (scoring, e.g. on ``test`` once).
        overrides: further train.json overrides the checkpoint needs (e.g. its ``network_def``), as JSON text or
            the dict that fire parses such text into.
        temperature: divides the class logits before the softmax, e.g. ``inference.json``'s ``cls_temperature``,
            so that a threshold of calibrated probabilities is scored as inference applies it.
    """
    extra = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    outputs = predict_split(dataset_dir, ckpt, {"image_size": [image_size, image_size], **extra}, split)
    outputs["cls"] = torch.softmax(torch.as_tensor(outputs["views_logits"][0]) / temperature, dim=-1).numpy()
    labels = image_classes(outputs["label"])
    result = malignant_operating_point(outputs["cls"], labels, sensitivity)
    if threshold is not None:
        result.update(threshold=threshold, **rates_at_threshold(outputs["cls"], labels, threshold))
    result["scores_at_threshold"] = score(outputs, malignant_threshold=result["threshold"])
    result["scores_arg_max"] = score(outputs)
    print(json.dumps({k: v for k, v in result.items() if k != "roc_fpr_tpr"}, indent=2))
    return result


@torch.no_grad()
def augmented_class_probs(
    dataset_dir: str,
    ckpts: list[str],
    overrides: dict,
    draws: int = 4,
    seed: int = 0,
    split: str = "validation",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities of each checkpoint on one split's images (validation unless ``split``) under the training
    augmentation (scanner-like resolution, speckle, gain and contrast changes, geometry): every drawn image is
    predicted by every checkpoint (on ``device``), so the models are compared on the same draws.

    Returns:
        probabilities ``(M, draws * N, 3)`` for the ``M`` checkpoints, and the true classes ``(draws * N,)``.
    """
    from monai.utils import set_determinism

    set_determinism(seed)
    parser = _parser(dataset_dir, {**overrides, "validate#split": split})
    items = parser.get_parsed_content("validate#datalist")()
    augment = parser.get_parsed_content("train#preprocessing")
    networks = [load_network(parser, ckpt).eval().to(device) for ckpt in ckpts]
    probs, labels = [], []
    for _ in range(draws):
        for item in items:
            sample = augment(dict(item))
            image = sample["image"].as_tensor()[None].float().to(device)
            probs.append([torch.softmax(net(image)["cls"][0].float(), dim=0).cpu().numpy() for net in networks])
            labels.append(int(sample["label"].max()))
    return np.stack(probs, axis=1), np.array(labels)


def ensemble(
    dataset_dir: str, ckpts: list[str], image_size: int = 160, draws: int = 4, overrides: dict | None = None
) -> dict:
    """Each checkpoint and the ensemble of all (mean of their segmentation and class probabilities) on validation,
    as it is (arg-max, :func:`score`) and under the training augmentation (benign / malignant and macro AUC of the
    class probabilities on ``draws`` draws of every validation image, the same draws for every model).

    Args:
        dataset_dir: the BUSI folder.
        ckpts: ``model.pt`` files of networks trained with the same ``network_def`` at ``image_size``.
        image_size: network input size.
        draws: augmented draws per validation image.
        overrides: further train.json overrides, e.g. ``{"network_def#encoder": "efficientnet-lite2"}`` or
            ``{"amp": False}`` (float32 whatever the CPU).
    """
    overrides = {**(overrides or {}), "image_size": [image_size, image_size]}
    members = [predict_split(dataset_dir, ckpt, overrides, "validation") for ckpt in ckpts]
    mean = {**members[0], **{key: np.mean([m[key] for m in members], axis=0) for key in ("seg", "cls")}}
    aug_probs, aug_labels = augmented_class_probs(dataset_dir, ckpts, overrides, draws)
    names = [Path(c).as_posix() for c in ckpts] + ["ensemble"]
    result = {}
    for name, out, probs in zip(names, members + [mean], list(aug_probs) + [aug_probs.mean(0)]):
        result[name] = {"validation": score(out), **augmented_scores(probs, aug_labels)}
        print(name, json.dumps({k: v if isinstance(v, float) else {m: round(x, 4) for m, x in v.items()}
                                for k, v in result[name].items()}), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire({"run": run, "rescore": rescore, "report": report, "evaluate": evaluate, "sweep": sweep,
               "operating_point": operating_point, "ensemble": ensemble})
