"""Cross-validation of the training recipe on the training split: is a seed ensemble better than one seed?

The validation split has chosen every recipe change and every shipped seed, so a comparison scored on it favours
whatever it picked. This tool makes fresh held-out data from the training split instead:

1. ``folds``: the training split's duplicate groups are dealt into ``K`` folds (stratified by class, whole groups,
   ``prepare_datalist.split_groups``). Fold ``k``'s datalist trains on the other folds, selects checkpoints on the
   usual validation split, and holds fold ``k`` out under its ``test`` key (the real test split is left out).
2. ``train``: every fold with every seed, the shipped ``train.json`` with only ``datalist`` and ``seed`` (and
   ``extra`` overrides) changed. A deadline stops the highest seed, then the last fold; no training is shortened.
3. ``predict``: each run's best checkpoint (``model.pt``, chosen on validation) on its held-out fold, as it is and
   under ``draws`` draws of the training augmentation (the same draws for every seed of a fold); saved as
   ``predictions_fold{k}.npz`` with each run's best validation score.
4. ``report``: per fold and pooled over the folds, each seed, the seed that validation would ship (best validation
   score) and the ensemble of the fold's seeds (mean probabilities), scored with ``ablate.score``.
5. ``thresholds`` (after ``predict --split validation``): whether a malignant threshold chosen on the validation
   split, as ``tools/calibrate.py`` chooses it, or on its augmented draws keeps its recall on the held-out folds.
6. ``compare``: two recipes cross-validated on the same folds (two ``--out`` folders, e.g. another encoder through
   ``--extra``): per fold and averaged, the candidate's ensemble minus the reference's on the held-out images
   (``--split validation``: on the validation images that chose the checkpoints).
7. ``cleanup``: MONAI's largest-connected-component and hole-filling transforms on one cross-validation's shipped
   lesion maps, against the plain maps (lesion Dice and IoU, per fold and averaged).
8. ``mix``: an ensemble of runs from several ``--out`` folders (e.g. two recipes' models, one seed each) as a folder
   of its own, which ``compare``, ``report`` and ``shift_test.py run`` score like any other.

Usage::

    python tools/cross_validate.py downscale --dataset_dir <BUSI> --out .busi/Dataset_BUSI_with_GT   # optional
    python tools/cross_validate.py folds --dataset_dir <BUSI> --out runs/cv --folds 3
    python tools/cross_validate.py train --dataset_dir <BUSI> --out runs/cv --seeds 3 --parallel 9
    python tools/cross_validate.py predict --dataset_dir <BUSI> --out runs/cv --device cuda
    python tools/cross_validate.py report --out runs/cv
    python tools/cross_validate.py predict --dataset_dir <BUSI> --out runs/cv --device cuda --split validation
    python tools/cross_validate.py thresholds --out runs/cv
    python tools/cross_validate.py compare --candidate runs/cv_lite2 --reference runs/cv
    python tools/cross_validate.py cleanup --out runs/cv_lite2 --split validation
    python tools/cross_validate.py mix --members runs/cv_lite2:0,runs/cv_scanspeckle:1 --out runs/mix_0_1
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import fire
import numpy as np
from ablate import (
    BUNDLE,
    THRESHOLD_RULES,
    TrainingPool,
    augmented_class_probs,
    augmented_scores,
    image_classes,
    malignant_operating_point,
    predict_split_checkpoints,
    rates_at_threshold,
    score,
    threshold_images,
)
from prepare_datalist import split_groups

DATALIST = BUNDLE / "configs" / "datalist_Dataset_BUSI_with_GT.json"
EPOCH_DONE = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete")
VAL_SCORE = re.compile(r"val_score: ([0-9.]+)")


def downscale(dataset_dir: str, out: str, max_side: int = 288) -> None:
    """Copy a BUSI-layout folder with every PNG shrunk to at most ``max_side`` pixels a side (images with a box
    filter, masks nearest), so that the cross-validation data fits a device machine's transfer limit (the 780 BUSI
    images: 109 MB -> 30 MB). The network input (160 px) is unchanged; every run of one cross-validation must read the
    same copy.

    Args:
        dataset_dir: the BUSI folder.
        out: the new folder; name it like the original (``.../Dataset_BUSI_with_GT``) so that train.json finds the
            committed datalist.
        max_side: longest side after shrinking; smaller images are copied as they are.
    """
    from PIL import Image

    source = Path(dataset_dir)
    for path in sorted(source.rglob("*.png")):
        target = Path(out) / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.load()
            scale = max_side / max(image.size)
            if scale < 1:
                size = (round(image.size[0] * scale), round(image.size[1] * scale))
                image = image.resize(size, Image.NEAREST if "_mask" in path.name else Image.BOX)
            image.save(target, optimize=True)


def folds(out: str = "runs/cv", folds: int = 3, seed: int = 0, datalist: str = str(DATALIST)) -> list[str]:
    """Write ``fold{k}.json`` datalists (see the module docstring).

    Args:
        out: output folder.
        folds: number of folds of the training split.
        seed: shuffling seed of the groups.
        datalist: the committed split.

    Returns:
        The fold datalist paths.
    """
    source = json.loads(Path(datalist).read_text())
    pool = source["training"]
    assignment = split_groups([e["group"] for e in pool], [e["class"] for e in pool], [1.0 / folds] * folds, seed)
    Path(out).mkdir(parents=True, exist_ok=True)
    paths = []
    for fold in range(folds):
        fold_list = {
            "description": f"fold {fold} of {folds} of {Path(datalist).name}'s training split: trains on the other "
            "folds, selects on its validation split, holds this fold out as 'test'",
            "training": [e for e, f in zip(pool, assignment) if f != fold],
            "validation": source["validation"],
            "test": [e for e, f in zip(pool, assignment) if f == fold],
        }
        path = Path(out) / f"fold{fold}.json"
        path.write_text(json.dumps(fold_list, indent=1))
        paths.append(str(path))
        counts = np.bincount([e["class"] for e in fold_list["test"]], minlength=3).tolist()
        print(f"{path}: {len(fold_list['training'])} training, {len(fold_list['test'])} held out {counts}")
    return paths


def prediction_path(out: str, fold: int, split: str = "test") -> Path:
    """Where :func:`predict` saves fold ``fold``'s predictions of its held-out (``test``) or ``validation`` images."""
    return Path(out) / (f"predictions_fold{fold}.npz" if split == "test" else f"validation_fold{fold}.npz")


def _epochs_done(log: Path) -> int:
    # a resumed run's log repeats the epochs after its last checkpoint: count each epoch once
    return len(set(EPOCH_DONE.findall(log.read_text(errors="replace")))) if log.is_file() else 0


def best_val_score(run_dir: Path) -> float:
    """Highest ``val_score`` in a run's ``train.log`` (the one its ``model.pt`` was saved at)."""
    return max(float(v) for v in VAL_SCORE.findall((run_dir / "train.log").read_text(errors="replace")))


def _runs(out: str, seeds: int, first_seed: int = 0) -> list[tuple[int, int, Path]]:
    fold_files = sorted(Path(out).glob("fold*.json"), key=lambda p: int(p.stem[4:]))
    seed_range = range(first_seed, first_seed + seeds)
    return [(int(f.stem[4:]), s, Path(out) / f"{f.stem}_seed{s}") for f in fold_files for s in seed_range]


def train(
    dataset_dir: str,
    out: str = "runs/cv",
    seeds: int = 3,
    parallel: int = 9,
    threads: int = 1,
    deadline_s: float | None = None,
    min_seeds: int = 3,
    min_folds: int = 2,
    extra: dict | None = None,
    fold: int | list[int] | None = None,
    first_seed: int = 0,
) -> None:
    """Train every (fold, seed) run (only those of ``fold`` if given), each in its own process; a finished run (its
    ``finished`` file, written when the training exits cleanly) is not run again, an interrupted one resumes from its
    ``checkpoint.pt`` (its ``train.log`` goes on, so the best validation score stays in it).

    Args:
        dataset_dir: the BUSI folder.
        out: the folder of :func:`folds`.
        seeds: seeds 0 .. ``seeds`` - 1 per fold.
        parallel: trainings at a time.
        threads: OpenMP threads per training.
        deadline_s: where the epoch rate measured since the last check says the runs would end later than this many
            seconds after the start, runs are stopped: the highest seed of every fold while more than ``min_seeds``
            seeds run, then the last fold while more than ``min_folds`` folds run. No training is shortened.
        min_seeds: seeds per fold kept whatever the deadline.
        min_folds: folds kept whatever the deadline.
        extra: train.json overrides for every run (e.g. ``{"amp": false}``).
        fold: train the runs of this fold (or these folds) only.
        first_seed: seeds ``first_seed`` .. ``first_seed + seeds`` - 1 instead (fresh seeds for a replication).
    """
    wanted = None if fold is None else set(np.atleast_1d(fold).tolist())
    runs = _runs(out, seeds, first_seed)
    jobs = [(f, seed, run_dir) for f, seed, run_dir in runs if wanted is None or f in wanted]
    jobs = [job for job in jobs if not (job[2] / "finished").is_file()]
    max_epochs = int((extra or {}).get("max_epochs", 80))
    pool, fold_seed, reference = TrainingPool(dataset_dir, parallel, threads), {}, None
    while jobs or pool.running:
        while jobs and pool.has_room():
            fold, seed, run_dir = jobs.pop(0)
            overrides = {**(extra or {}), "datalist": str((Path(out) / f"fold{fold}.json").resolve())}
            resume = (run_dir / "models" / "checkpoint.pt").is_file()  # an interrupted run goes on where it stopped
            if resume:
                overrides["resume"] = True
            pool.start(run_dir, overrides, seed, append_log=resume)
            fold_seed[run_dir] = (fold, seed)
        for run_dir, returncode, _ in pool.wait():
            if returncode == 0:
                (run_dir / "finished").touch()
        if deadline_s is None or not pool.running or jobs:
            continue
        elapsed, done = pool.elapsed(), min(_epochs_done(run_dir / "train.log") for run_dir in pool.running)
        if done < 1:
            continue
        if reference is None:
            reference = (elapsed, done)
        if done < reference[1] + 2:
            continue
        projected = elapsed + (max_epochs - done) * (elapsed - reference[0]) / (done - reference[1])
        reference = (elapsed, done)
        if projected <= deadline_s:
            continue
        folds_running = sorted({fold_seed[run_dir][0] for run_dir in pool.running})
        seeds_running = sorted({fold_seed[run_dir][1] for run_dir in pool.running})
        if len(seeds_running) > min_seeds:
            stop, what = [d for d in pool.running if fold_seed[d][1] == seeds_running[-1]], f"seed {seeds_running[-1]}"
        elif len(folds_running) > min_folds:
            stop, what = [d for d in pool.running if fold_seed[d][0] == folds_running[-1]], f"fold {folds_running[-1]}"
        else:
            continue
        for run_dir in stop:
            pool.stop(run_dir)
        reference = None
        print(f"{elapsed:6.0f} s: {done} epochs done, projected {projected:.0f} s > {deadline_s:.0f} s: {what} "
              "stopped", flush=True)


def predict(
    dataset_dir: str,
    out: str = "runs/cv",
    seeds: int = 3,
    draws: int = 4,
    device: str = "cpu",
    extra: dict | None = None,
    fold: int | None = None,
    split: str = "test",
    first_seed: int = 0,
) -> None:
    """Predict each fold's held-out images (only fold ``fold`` if given) with the best checkpoint of each of its
    finished seeds; with ``split="validation"``, the validation images instead (what the fold's models chose their
    checkpoints and would choose a threshold on).

    Saves ``predictions_fold{k}.npz`` (``validation_fold{k}.npz`` for the validation split): ``cls`` ``(S, N, 3)``,
    ``seg`` lesion probabilities ``(S, N, H, W)`` as uint8 (x 255), ``label`` ``(N, H, W)``, ``augmented_cls``
    ``(S, draws * N, 3)`` with ``augmented_label``, ``val_score`` ``(S,)`` and ``seeds``. Seeds ``first_seed`` ..
    ``first_seed + seeds`` - 1 are used.
    """
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' (the held-out fold) or 'validation', got {split!r}.")
    by_fold: dict[int, list[tuple[int, Path]]] = {}
    for run_fold, seed, run_dir in _runs(out, seeds, first_seed):
        if (run_dir / "finished").is_file() and fold in (None, run_fold):
            by_fold.setdefault(run_fold, []).append((seed, run_dir))
    for fold, runs in sorted(by_fold.items()):
        overrides = {**(extra or {}), "datalist": str((Path(out) / f"fold{fold}.json").resolve())}
        ckpts = [str(run_dir / "models" / "model.pt") for _, run_dir in runs]
        outputs = predict_split_checkpoints(dataset_dir, ckpts, overrides, split, device=device)
        aug_cls, aug_label = augmented_class_probs(dataset_dir, ckpts, overrides, draws, split=split, device=device)
        path = prediction_path(out, fold, split)
        np.savez_compressed(
            path,
            cls=np.stack([o["cls"] for o in outputs]),
            seg=np.round(np.stack([o["seg"] for o in outputs]) * 255).astype(np.uint8),
            label=outputs[0]["label"].astype(np.uint8),
            augmented_cls=aug_cls,
            augmented_label=aug_label,
            val_score=np.array([best_val_score(run_dir) for _, run_dir in runs]),
            seeds=np.array([seed for seed, _ in runs]),
            epochs=np.array([_epochs_done(run_dir / "train.log") for _, run_dir in runs]),
        )
        print(f"saved {path}: seeds {[s for s, _ in runs]}, {len(outputs[0]['cls'])} {split} images", flush=True)


def _scores(
    cls: np.ndarray, seg: np.ndarray, label: np.ndarray, aug_cls: np.ndarray, aug_label: np.ndarray, map_cleanup=None
) -> dict:
    return {**score({"cls": cls, "seg": seg, "label": label}, map_cleanup=map_cleanup),
            **augmented_scores(aug_cls, aug_label)}  # fmt: skip


def ensemble_outputs(data: dict, members=slice(None)) -> dict[str, np.ndarray]:
    """The ensemble of ``members`` (indices or a mask into the seed axis) of one fold's stored predictions: mean class
    probabilities ``cls``, mean lesion probabilities ``seg`` and the label maps, as ``ablate.score`` takes them."""
    seg = data["seg"][members].astype(np.float32) / 255.0
    return {"cls": data["cls"][members].mean(0), "seg": seg.mean(0), "label": data["label"]}


def _ensemble_scores(data: dict, members=slice(None), map_cleanup=None) -> dict:
    """Scores of the mean probabilities of ``members`` (indices or a mask into the seed axis) of one fold's data
    (``map_cleanup``: see ``ablate.score``)."""
    outputs = ensemble_outputs(data, members)
    return _scores(outputs["cls"], outputs["seg"], outputs["label"], data["augmented_cls"][members].mean(0),
                   data["augmented_label"], map_cleanup)  # fmt: skip


def ensemble_against_selected(data: dict, members: int = 3) -> dict[str, float]:
    """Mean over every ``members``-seed subset of one fold's seeds of (ensemble - the subset's validation-selected
    seed), per score, on the fold's held-out images."""
    seg = data["seg"].astype(np.float32) / 255.0
    differences = []
    for subset in itertools.combinations(range(len(data["seeds"])), members):
        subset = list(subset)
        chosen = subset[int(np.argmax(data["val_score"][subset]))]
        ensemble = _ensemble_scores(data, subset)
        selected = _scores(data["cls"][chosen], seg[chosen], data["label"], data["augmented_cls"][chosen],
                           data["augmented_label"])  # fmt: skip
        differences.append({key: ensemble[key] - selected[key] for key in ensemble})
    return {key: float(np.mean([d[key] for d in differences])) for key in differences[0]}


def report(out: str = "runs/cv", members: int = 3) -> str:
    """Scores of every seed, the validation-selected seed and the ensemble of the fold's seeds, per fold and pooled
    (see the docstring); and ``ensemble_minus_selected``: per fold and averaged over the folds, the mean over every
    ``members``-seed subset of (ensemble - the subset's validation-selected seed). Saved as ``report.json``.

    Returns:
        A markdown table of the main scores.
    """
    folds_data = [dict(np.load(p)) for p in sorted(Path(out).glob("predictions_fold*.npz"))]
    if not folds_data:
        raise FileNotFoundError(f"no predictions_fold*.npz in {out}: run 'predict' first")
    result: dict[str, dict] = {}
    pooled: dict[str, list] = {}
    for index, data in enumerate(folds_data):
        seg = data["seg"].astype(np.float32) / 255.0
        selected = int(np.argmax(data["val_score"]))
        candidates = {f"seed{s}": i for i, s in enumerate(data["seeds"])}
        candidates["selected"] = selected
        fold_result = {}
        for name, i in [*candidates.items(), ("ensemble", None)]:
            cls = data["cls"].mean(0) if i is None else data["cls"][i]
            seg_map = seg.mean(0) if i is None else seg[i]
            aug = data["augmented_cls"].mean(0) if i is None else data["augmented_cls"][i]
            fold_result[name] = _scores(cls, seg_map, data["label"], aug, data["augmented_label"])
            pooled.setdefault(name, []).append((cls, seg_map, data["label"], aug, data["augmented_label"]))
        seed_names = [n for n in fold_result if n.startswith("seed")]
        fold_result["seed_mean"] = {k: float(np.mean([fold_result[n][k] for n in seed_names]))
                                    for k in fold_result["ensemble"]}  # fmt: skip
        fold_result["selected_seed"] = int(data["seeds"][selected])
        result[f"fold{index}"] = fold_result
        if len(data["seeds"]) >= members:
            differences = ensemble_against_selected(data, members)
            result.setdefault("ensemble_minus_selected", {})[f"fold{index}"] = differences
    if "ensemble_minus_selected" in result:
        per_fold = list(result["ensemble_minus_selected"].values())
        result["ensemble_minus_selected"]["mean"] = {k: float(np.mean([d[k] for d in per_fold])) for k in per_fold[0]}
    result["pooled"] = {
        name: _scores(*(np.concatenate([part[j] for part in parts]) for j in range(5)))
        for name, parts in pooled.items()
    }
    keys = ("score", "dice", "iou", "macro_f1", "accuracy", "normal_fp", "malignant_recall", "lesion_called_normal",
            "macro_auc", "benign_malignant_auc", "specificity_at_0.9_recall", "augmented_benign_malignant_auc",
            "augmented_macro_auc")  # fmt: skip
    lines = ["| fold | model | " + " | ".join(keys) + " |", "| --- | --- |" + " ---: |" * len(keys)]
    for fold, fold_result in result.items():
        for name, scores in fold_result.items():
            if isinstance(scores, dict):
                name = f"{members}-seed ensemble - selected, {name}" if fold == "ensemble_minus_selected" else name
                lines.append(f"| {fold} | {name} | " + " | ".join(f"{scores[k]:.3f}" for k in keys) + " |")
    (Path(out) / "report.json").write_text(json.dumps(result, indent=1))
    return "\n".join(lines)


def compare(candidate: str, reference: str, seeds: int | None = None, split: str = "test") -> dict:
    """Two recipes on the same held-out folds: for every fold that both folders predicted, the candidate's ensemble
    (mean probabilities of its seeds) minus the reference's, per score; and the mean over those folds. Saved as
    ``compare.json`` (``compare_validation.json`` for ``split`` ``validation``) in ``candidate``.

    Args:
        candidate: ``--out`` folder of the recipe under test.
        reference: ``--out`` folder of the recipe it is compared with, cross-validated on the same folds.
        seeds: use only the seeds below this number in both (``None``: every predicted seed).
        split: the fold models' held-out images (``test``) or the ``validation`` images that chose their checkpoints.

    Returns:
        ``{"fold<k>": {score: difference}, "mean": {score: difference}, "folds": [k, ...]}``.
    """
    differences: dict[str, dict] = {}
    pattern = prediction_path(candidate, 0, split).name.replace("fold0", "fold*")
    for path in sorted(Path(candidate).glob(pattern)):
        other = Path(reference) / path.name
        if not other.is_file():
            continue
        pair = [dict(np.load(path)), dict(np.load(other))]
        if not all(np.array_equal(pair[0][key], pair[1][key]) for key in ("label", "augmented_label")):
            raise ValueError(f"{path.name}: the two folders did not predict the same held-out images")
        keeps = [np.ones(len(d["seeds"]), bool) if seeds is None else d["seeds"] < seeds for d in pair]
        if not all(keep.any() for keep in keeps):
            raise ValueError(f"{path.name}: no seed below {seeds} in one of the two folders")
        scores = [_ensemble_scores(data, keep) for data, keep in zip(pair, keeps)]
        fold = re.search(r"fold\d+$", path.stem).group()
        differences[fold] = {key: scores[0][key] - scores[1][key] for key in scores[0]}
    if not differences:
        raise FileNotFoundError(f"no {pattern} in both {candidate} and {reference}: run 'predict' first")
    per_fold = list(differences.values())
    result = {**differences, "mean": {k: float(np.mean([d[k] for d in per_fold])) for k in per_fold[0]},
              "folds": sorted(differences)}  # fmt: skip
    name = "compare.json" if split == "test" else f"compare_{split}.json"
    (Path(candidate) / name).write_text(json.dumps(result, indent=1))
    return result


def _member(item: str) -> tuple[Path, int]:
    folder, _, seed = str(item).rpartition(":")
    if not folder or not seed.isdigit():
        raise ValueError(f"a mix member is 'folder:seed', got {item!r}")
    return Path(folder), int(seed)


def mix(members: str | list[str], out: str) -> list[str]:
    """One ensemble made of runs from several cross-validations of the same folds.

    For every fold and split that all members' folders predicted, ``out`` gets a ``predictions_fold{k}.npz``
    (``validation_fold{k}.npz``) that stacks the members' outputs in the order given, their seeds renumbered
    ``0 .. n - 1``, and ``fold{k}_seed{i}`` links to the member runs, so that ``compare``, ``report`` and
    ``shift_test.py run --cv out --seeds n`` score the mix like any cross-validation.

    Args:
        members: ``folder:seed`` items (a list, or one string with commas), e.g.
            ``runs/cv_lite2:0,runs/cv_scanspeckle:1``.
        out: the new folder.

    Returns:
        The prediction files written.

    Raises:
        ValueError: a member is malformed, the folders' fold files differ, or their predictions are not of the
            same images, or a prediction file lacks the member's seed.
    """
    parsed = [_member(item) for item in (members.split(",") if isinstance(members, str) else members)]
    fold_files = sorted(parsed[0][0].glob("fold*.json"))
    if not fold_files:
        raise FileNotFoundError(f"no fold*.json in {parsed[0][0]}")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for fold_file in fold_files:
        for folder, _ in parsed[1:]:
            if (folder / fold_file.name).read_bytes() != fold_file.read_bytes():
                raise ValueError(f"{folder / fold_file.name} differs from {fold_file}: the members' folds differ")
        (target / fold_file.name).write_bytes(fold_file.read_bytes())
        fold = int(fold_file.stem[4:])
        for index, (folder, seed) in enumerate(parsed):
            run, link = (folder / f"fold{fold}_seed{seed}").resolve(), target / f"fold{fold}_seed{index}"
            if run.is_dir() and not link.exists():
                link.symlink_to(run, target_is_directory=True)
        for split in ("test", "validation"):
            sources = [prediction_path(str(folder), fold, split) for folder, _ in parsed]
            if not all(path.is_file() for path in sources):
                continue
            loaded = [dict(np.load(path)) for path in sources]
            rows = []
            for path, data, (_, seed) in zip(sources, loaded, parsed):
                if not all(np.array_equal(data[key], loaded[0][key]) for key in ("label", "augmented_label")):
                    raise ValueError(f"{path} and {sources[0]} are not predictions of the same images")
                found = np.flatnonzero(data["seeds"] == seed)
                if not len(found):
                    raise ValueError(f"{path} holds seeds {data['seeds'].tolist()}, not {seed}")
                rows.append(int(found[0]))
            stacked = {key: np.stack([data[key][row] for data, row in zip(loaded, rows)])
                       for key in ("cls", "seg", "augmented_cls", "val_score", "epochs")}  # fmt: skip
            path = prediction_path(out, fold, split)
            np.savez_compressed(path, **stacked, label=loaded[0]["label"], augmented_label=loaded[0]["augmented_label"],
                                seeds=np.arange(len(parsed)))  # fmt: skip
            written.append(str(path))
    return written


def map_cleanups() -> dict:
    """The lesion-map clean-ups that ``cleanup`` scores, by name: MONAI transforms on a binary ``(1, H, W)`` map."""
    from monai.transforms import Compose, FillHoles, KeepLargestConnectedComponent

    largest = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False)
    return {"largest_component": largest, "largest_component_filled": Compose([largest, FillHoles(applied_labels=[1])])}


def cleanup(out: str = "runs/cv", split: str = "test") -> dict:
    """Each of :func:`map_cleanups` applied to the shipped maps of every fold's ensemble: the clean-up minus the
    plain maps, per fold and averaged over the folds, for the lesion Dice and IoU (no other score can change: a
    clean-up never empties a map). Saved as ``cleanup.json`` (``cleanup_validation.json``) in ``out``.

    Args:
        out: ``--out`` folder of a predicted cross-validation.
        split: the held-out images (``test``) or the ``validation`` images.

    Returns:
        ``{cleanup: {"fold<k>": {"dice": d, "iou": d}, ..., "mean": {...}}}``.
    """
    pattern = prediction_path(out, 0, split).name.replace("fold0", "fold*")
    paths = sorted(Path(out).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no {pattern} in {out}: run 'predict' first")
    result: dict[str, dict] = {}
    for path in paths:
        data = dict(np.load(path))
        fold = re.search(r"fold\d+$", path.stem).group()
        plain = _ensemble_scores(data)
        for name, transform in map_cleanups().items():
            cleaned = _ensemble_scores(data, map_cleanup=transform)
            result.setdefault(name, {})[fold] = {key: cleaned[key] - plain[key] for key in ("dice", "iou")}
    for folds in result.values():
        folds["mean"] = {key: float(np.mean([f[key] for f in folds.values()])) for key in ("dice", "iou")}
    name = "cleanup.json" if split == "test" else f"cleanup_{split}.json"
    (Path(out) / name).write_text(json.dumps(result, indent=1))
    return result


def thresholds(out: str = "runs/cv", sensitivity: float = 0.9) -> dict:
    """Does a malignant threshold chosen on validation keep its recall on images no selection has seen?

    For each fold, the ensemble of its seeds (mean probabilities, no temperature) gets a ``p(malignant)`` threshold
    from each rule (``validation``, ``augmented_validation``, ``validation_and_augmented``: the highest that reaches
    ``sensitivity`` malignant recall on the validation images, on their augmented draws, or on both together;
    ``ablate.malignant_operating_point``), and is
    scored at it on the fold's held-out images, as they are and under their augmented draws. Saved as
    ``thresholds.json``.

    Returns:
        per rule: per fold and averaged over the folds, the threshold, the validation recall, and the held-out
        malignant recall and benign specificity (clean and augmented).
    """
    result: dict[str, dict] = {}
    for held_out_path in sorted(Path(out).glob("predictions_fold*.npz")):
        fold = held_out_path.stem[len("predictions_") :]
        validation_path = Path(out) / f"validation_{fold}.npz"
        if not validation_path.is_file():
            raise FileNotFoundError(f"{validation_path} is missing: run 'predict --split validation' first")
        held_out, validation = dict(np.load(held_out_path)), dict(np.load(validation_path))
        val_probs, val_labels = validation["cls"].mean(0), image_classes(validation["label"])
        aug_probs, aug_labels = validation["augmented_cls"].mean(0), validation["augmented_label"]
        held_out_probs, held_out_labels = held_out["cls"].mean(0), image_classes(held_out["label"])
        held_out_aug_probs, held_out_aug_labels = held_out["augmented_cls"].mean(0), held_out["augmented_label"]
        for rule in THRESHOLD_RULES:
            probs, labels = threshold_images(rule, val_probs, val_labels, aug_probs, aug_labels)
            chosen = malignant_operating_point(probs, labels, sensitivity)
            clean = rates_at_threshold(held_out_probs, held_out_labels, chosen["threshold"])
            augmented = rates_at_threshold(held_out_aug_probs, held_out_aug_labels, chosen["threshold"])
            result.setdefault(rule, {})[fold] = {
                "threshold": chosen["threshold"],
                "chosen_on_recall": chosen["sensitivity"],
                "held_out_recall": clean["sensitivity"],
                "held_out_specificity": clean["specificity"],
                "held_out_augmented_recall": augmented["sensitivity"],
                "held_out_augmented_specificity": augmented["specificity"],
            }
    for folds in result.values():
        keys = next(iter(folds.values()))
        folds["mean"] = {key: float(np.mean([f[key] for f in folds.values()])) for key in keys}
    (Path(out) / "thresholds.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(BUNDLE))
    fire.Fire({"downscale": downscale, "folds": folds, "train": train, "predict": predict, "report": report,
               "thresholds": thresholds, "compare": compare, "cleanup": cleanup, "mix": mix})
