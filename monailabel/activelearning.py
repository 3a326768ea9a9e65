"""Active learning for the served bundle: score each unlabelled image by the bundle's own uncertainty, hand out
the most uncertain first.

``prepare_app.py`` copies this file into the MONAI Label app; the app's ``main.py`` (``monailabel/app_main.py``)
registers both classes through MONAI Label's own hooks, ``init_scoring_methods()`` and ``init_strategies()``:

- scoring method ``bundle_uncertainty`` (:class:`BundleUncertaintyScoring`): runs the served bundle's inference
  task on every image of the datastore without a final label and stores the result's ``uncertainty`` (a float in
  [0, 1], higher = less certain: the normalized entropy of the class probabilities, see the model card) and
  ``status`` (``"ok"`` or ``"not assessable"``) in the image's info, where ``/datastore`` shows them. Images
  already scored with the same weights (SHA-256 of the model file) are skipped unless the request says
  ``{"force": true}``. Labelled images are not scored: they are no candidates.
- strategy ``uncertainty`` (:class:`MostUncertain`): the unlabelled image with the highest stored uncertainty. The
  order is: scored images whose status is ``"ok"``, by uncertainty, highest first; then scored images that are
  ``"not assessable"`` (blank, too small or unlike the training images: a reviewer should see them, but their
  label teaches the model little and their uncertainty is not meaningful), by uncertainty; then images never
  scored (added since the last scoring, or whose inference failed), by id. Ties go by image id. Nothing is scored
  on the fly: the strategy answers at once, and MONAI Label runs the scoring again by itself (on start, after each
  training and after each next-sample request; ``MONAI_LABEL_AUTO_UPDATE_SCORING``).

The same image is handed out until it has a final label (one annotator at a time).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)

SCORING_NAME = "bundle_uncertainty"
STRATEGY_NAME = "uncertainty"

# keys of the bundle's inference result JSON (scripts.transforms.MonaiLabelOutputd, scripts.reliability)
RESULT_UNCERTAINTY = "uncertainty"
RESULT_STATUS = "status"
STATUS_OK = "ok"
NOT_ASSESSABLE = "not assessable"

# keys of the image info in the datastore
INFO_UNCERTAINTY = "uncertainty"
INFO_STATUS = "uncertainty_status"
INFO_WEIGHTS = "uncertainty_weights"  # first 16 hex digits of the SHA-256 of the weights that gave the score
INFO_TIME = "uncertainty_ts"


class UncertaintyContractError(ValueError):
    """The bundle's inference result lacks a valid ``uncertainty`` or ``status`` (a bundle older than this code)."""


def read_uncertainty(result: dict[str, Any]) -> tuple[float, str]:
    """The uncertainty and status of one inference result JSON, checked against the bundle's contract.

    Args:
        result: the JSON part of a MONAI Label inference result of the bundle.

    Returns:
        ``(uncertainty, status)``: a float in [0, 1] and ``"ok"`` or ``"not assessable"``.

    Raises:
        UncertaintyContractError: when either key is missing or its value is out of the contract.
    """
    missing = [key for key in (RESULT_UNCERTAINTY, RESULT_STATUS) if key not in result]
    if missing:
        raise UncertaintyContractError(
            f"the bundle's inference result has no {' and no '.join(repr(key) for key in missing)} "
            f"(keys: {sorted(result)}); active learning needs a bundle whose MonaiLabelOutputd returns them "
            "(update the served bundle from this repository's bundle/)"
        )
    value, status = result[RESULT_UNCERTAINTY], result[RESULT_STATUS]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UncertaintyContractError(f"the bundle's 'uncertainty' must be a number in [0, 1], got {value!r}")
    if status not in (STATUS_OK, NOT_ASSESSABLE):
        raise UncertaintyContractError(
            f"the bundle's 'status' must be '{STATUS_OK}' or '{NOT_ASSESSABLE}', got {status!r}"
        )
    return float(value), status


def priority(image_id: str, info: dict[str, Any]) -> tuple[int, float, str]:
    """Sort key of an unlabelled image for :class:`MostUncertain` (smallest first; see the module docstring)."""
    value = info.get(INFO_UNCERTAINTY)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return 2, 0.0, image_id
    group = 0 if info.get(INFO_STATUS) == STATUS_OK else 1
    return group, -float(value), image_id


def rank(infos: dict[str, dict[str, Any]]) -> list[str]:
    """Image ids of ``infos`` (id to image info) in the order the strategy hands them out."""
    return sorted(infos, key=lambda image_id: priority(image_id, infos[image_id]))


def weights_digest(path: str | os.PathLike | None) -> str:
    """Short SHA-256 of the weights file, what a stored score was computed with; ``""`` when there is none."""
    if not path or not Path(path).is_file():
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class BundleUncertaintyScoring(ScoringMethod):
    """Scoring method: the bundle's ``uncertainty`` and ``status`` of each unlabelled image, kept in its info.

    Args:
        infer_task: the served bundle's inference task (the one ``/infer/<model>`` runs), so that a score is
            exactly what an inference request would return.
        model: the model's name, for the log and the summary.
    """

    def __init__(self, infer_task: Any, model: str) -> None:
        super().__init__(f"Uncertainty of the bundle's prediction ({model}) for each unlabelled image")
        self.infer_task = infer_task
        self.model = model

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Score the unlabelled images that need it; return a summary (the scoring task's result).

        Args:
            request: MONAI Label's scoring request; ``force`` (bool) rescores images already scored with the
                current weights.
            datastore: the app's datastore.

        Raises:
            UncertaintyContractError: when the bundle returns no valid uncertainty (the run stops at once: every
                other image would fail the same way).
        """
        start = time.monotonic()
        datastore.refresh()  # labels or images added by the server since this process loaded the datastore
        weights = weights_digest(self.infer_task.get_path())
        force = bool(request.get("force", False))
        unlabelled = sorted(datastore.get_unlabeled_images())
        todo = [i for i in unlabelled if force or datastore.get_image_info(i).get(INFO_WEIGHTS) != weights]
        failed, not_assessable = [], 0
        for image_id in todo:
            try:
                value, status = self.score(datastore.get_image_uri(image_id))
            except UncertaintyContractError:
                raise
            except Exception as error:  # one unreadable image must not stop the others; it stays unscored
                logger.warning("%s: %s: inference failed, not scored: %s", SCORING_NAME, image_id, error)
                failed.append(image_id)
                continue
            not_assessable += status != STATUS_OK
            self.store(datastore, image_id, {INFO_UNCERTAINTY: value, INFO_STATUS: status, INFO_WEIGHTS: weights})
        summary = {
            "method": SCORING_NAME,
            "model": self.model,
            "weights": weights,
            "unlabeled": len(unlabelled),
            "scored": len(todo) - len(failed),
            "skipped": len(unlabelled) - len(todo),
            "not_assessable": not_assessable,
            "failed": failed,
            "seconds": round(time.monotonic() - start, 3),
        }
        logger.info("%s: %s", SCORING_NAME, summary)
        return summary

    def score(self, image_uri: str) -> tuple[float, str]:
        """Run the bundle's inference on one image file; return its uncertainty and status."""
        # the JSON is all that is needed: MONAI Label's writer then returns the label map instead of saving it
        _, result = self.infer_task({"image": image_uri, "logging": "WARNING", "result_write_to_file": False})
        return read_uncertainty(result or {})

    @staticmethod
    def store(datastore: Datastore, image_id: str, info: dict[str, Any]) -> None:
        """Write one image's score; the datastore is reloaded first so that a label or image the server saved
        meanwhile is not overwritten by this process's older copy of the datastore file."""
        datastore.refresh()
        if image_id not in datastore.get_unlabeled_images():
            return  # labelled or removed while scoring: no longer a candidate
        datastore.update_image_info(image_id, {**info, INFO_TIME: int(time.time())})


class MostUncertain(Strategy):
    """Strategy: the unlabelled image with the highest stored uncertainty (order: see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(
            f"Most uncertain first: the unlabelled image with the highest bundle uncertainty "
            f"(scoring method '{SCORING_NAME}')"
        )

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, str] | None:
        """``{"id": <next image to label>}``, or ``None`` when every image has a final label."""
        datastore.refresh()  # scores are written by the scoring task's own process
        infos = {image_id: datastore.get_image_info(image_id) for image_id in datastore.get_unlabeled_images()}
        if not infos:
            return None
        order = rank(infos)
        chosen = order[0]
        logger.info(
            "%s: next sample %s (uncertainty %s, status %s); %d unlabelled, %d never scored",
            STRATEGY_NAME, chosen, infos[chosen].get(INFO_UNCERTAINTY), infos[chosen].get(INFO_STATUS),
            len(order), sum(priority(i, infos[i])[0] == 2 for i in order),
        )  # fmt: skip
        return {"id": chosen}
