"""Deprecated: the demo summary is `mmjax.demo_summary`, named in `config.summary_hooks`.

Importing this module (e.g. from an old config's `imports`) still adds the hook to every
run's summary, through the deprecated `mmjax.train.trainer.SUMMARY_HOOKS` list.
"""
import warnings

from mmjax.demo_summary import (RETRIEVAL, VQA, chance_levels, demo_summary_hook,  # noqa: F401
                                format_demo_summary)
from mmjax.train import trainer

warnings.warn("experiments.demo_summary moved to mmjax.demo_summary; name its hook in the "
              "config instead: config.summary_hooks = ('mmjax.demo_summary.demo_summary_hook',)",
              DeprecationWarning, stacklevel=2)

if demo_summary_hook not in trainer.SUMMARY_HOOKS:
  trainer.SUMMARY_HOOKS.append(demo_summary_hook)
