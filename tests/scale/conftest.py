"""One local Ray cluster per test module: 2 CPUs, no dashboard, quiet logs, shut down after the module.

Ray is an optional extra; the tests that need it take the ``ray_cluster`` fixture, which skips them
when Ray is not installed. Shutting the cluster down at the end of each module keeps its worker
processes and threads from running beside unrelated tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

# uv's run-time environment hook would start a second Python per worker; the dashboard and usage
# stats are not needed to run tasks and cost a second or two of start-up on 2 CPUs.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster with 2 CPUs for the module's tests; yields the ``ray`` module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a previous module that did not shut down: start from a clean cluster
        ray.shutdown()
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
