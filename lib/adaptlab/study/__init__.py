"""One study across adaptation methods on one model and task (``scripts/study.py``).

- :mod:`~adaptlab.study.config`: :class:`StudyConfig`, the typed config;
- :mod:`~adaptlab.study.plan`: the method registry (:data:`METHODS`) and the stages, each one
  call of an existing recipe, hashed by the recipe's own parsed config;
- :mod:`~adaptlab.study.preflight`: checks of the task and of each method on the model, before
  any stage runs;
- :mod:`~adaptlab.study.stages`: running the stages with their cache (one record file per stage);
- :mod:`~adaptlab.study.collect`: reading the stages' reported numbers and per-example outputs,
  agreement and spread over seeds;
- :mod:`~adaptlab.study.summary`: ``study.json``, ``report.md`` and the figures.
"""

from adaptlab.study.config import StudyConfig
from adaptlab.study.plan import METHODS, Stage, plan

__all__ = ["METHODS", "Stage", "StudyConfig", "plan"]
