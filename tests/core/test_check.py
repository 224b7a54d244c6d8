"""Pipeline.check: a call's validation and block checks, without running a block."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from tests.core.test_plan import COMPONENTS, img2img_switch, toy_blocks


def test_check_refuses_what_the_call_refuses() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    for bad in ({"height": 12}, {"num_inference_steps": 0, "promt": "x"}):
        with pytest.raises(InputError) as checked:
            pipe.check(**bad)
        with pytest.raises(InputError) as called:
            pipe(**bad, progress=False)
        assert str(checked.value) == str(called.value)


def test_check_names_the_workflow_and_runs_no_model() -> None:
    forwards: list[Any] = []
    hook = COMPONENTS["denoiser"].register_forward_hook(lambda *args: forwards.append(args))
    try:
        pipe = Pipeline(img2img_switch(), COMPONENTS)
        assert pipe.check(height=16) == "text2img"
        assert pipe.check(image=torch.rand(1, 4, 16, 16), strength=0.5) == "img2img"
        assert forwards == []
        pipe(height=16, progress=False)
        assert forwards  # the same hook sees a real call
    finally:
        hook.remove()
