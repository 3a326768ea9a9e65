"""The served app: MONAI Label's stock ``monaibundle`` app, unchanged, plus active learning by the bundle's uncertainty.

``prepare_app.py`` installs this file as the app's ``main.py``, keeps the stock ``main.py`` beside it as
``monaibundle_main.py`` and copies ``activelearning.py`` next to them. MONAI Label loads the class of ``main.py``
that names ``MONAILabelApp`` among its direct bases, so :class:`BreastUltrasoundApp` lists it after the stock
``MyApp`` (whose methods it inherits) and the stock module is loaded under another name, not imported into this
namespace, where MONAI Label would find its ``MyApp`` first.

Added, through MONAI Label's own hooks (see ``activelearning.py``):

- scoring method ``bundle_uncertainty`` (``init_scoring_methods``), on the model given by ``--conf
  uncertainty_model NAME`` (default: the first served model);
- strategy ``uncertainty`` (``init_strategies``), listed first so that 3D Slicer's strategy box offers it first;
  the stock ``random`` and ``first`` stay.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import ModuleType

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

HERE = Path(__file__).resolve().parent
STOCK_MAIN = "monaibundle_main.py"
logger = logging.getLogger(__name__)


def _load(name: str, path: Path) -> ModuleType:
    """Import a file of the app folder by path (MONAI Label puts the app folder on ``sys.path`` only in some runs)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_stock = _load("monaibundle_stock_main", HERE / STOCK_MAIN)
_activelearning = _load("bundle_activelearning", HERE / "activelearning.py")


class BreastUltrasoundApp(_stock.MyApp, MONAILabelApp):
    """The stock monaibundle app with the bundle-uncertainty scoring method and strategy."""

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {_activelearning.STRATEGY_NAME: _activelearning.MostUncertain()}
        strategies.update(super().init_strategies())
        logger.info(f"+++ Adding Strategy:: {_activelearning.STRATEGY_NAME} (bundle uncertainty)")
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        methods = dict(super().init_scoring_methods())
        model = self.conf.get("uncertainty_model") or next(iter(self.models), None)
        task = self._infers.get(model) if model else None
        if task is None:
            logger.warning(f"no served model '{model}': scoring method {_activelearning.SCORING_NAME} not added")
            return methods
        methods[_activelearning.SCORING_NAME] = _activelearning.BundleUncertaintyScoring(task, model)
        logger.info(f"+++ Adding Scoring Method:: {_activelearning.SCORING_NAME} => {model}")
        return methods
