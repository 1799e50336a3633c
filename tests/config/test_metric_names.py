"""The config's list of built-in metric names (the config may not import eval) is eval's."""

from __future__ import annotations

from forgetless.config.schema import METRICS, check_metric
from forgetless.eval import headline


def test_the_built_in_metrics_are_evals():
    assert METRICS == tuple(headline.RESULT_KEYS)
    assert headline.check_metric is check_metric  # one check, used by both
