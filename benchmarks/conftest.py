"""The step benchmarks run only when asked for: ``pytest benchmarks --benchmark-only``.

A bare ``pytest`` (or one that collects this folder by accident) skips them, so the ordinary suite
(``pytest tests``) never pays for them.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def pytest_collection_modifyitems(config, items):
    try:
        only = config.getoption("benchmark_only")
    except ValueError:  # pytest-benchmark is not installed
        only = False
    if only:
        return
    skip = pytest.mark.skip(reason="step benchmarks: run with `pytest benchmarks --benchmark-only`")
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(HERE + os.sep):
            item.add_marker(skip)
