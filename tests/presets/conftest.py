"""Preset tests run torch on one thread.

The tiny models' ops take microseconds; on a shared 2-core machine a second torch thread that
waits for a core held by another process makes them 10-100x slower, and one thread is as fast
when the machine is idle.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
