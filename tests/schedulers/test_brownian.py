"""The Brownian tree of DPM-Solver SDE: torchsde's noise for a seed, whatever the queries."""

from __future__ import annotations

import pytest
import torch

from diffblocks.components.schedulers import DPMSolverSDEScheduler
from diffblocks.components.schedulers.brownian import BrownianTree
from tests.schedulers.parity import SD, SHAPE, fake_model

# the queries of a 10-step Karras DPM++ SDE run: each step's first and second stage, in sigma
QUERIES = [(14.6, 9.1), (9.1, 5.7), (5.7, 3.3), (3.3, 1.77), (1.77, 0.9), (0.9, 0.4), (0.4, 0.15), (0.15, 0.0292)]


def _tree(seed: int = 3) -> BrownianTree:
    return BrownianTree(0.0292, 14.6, shape=(2, 3, 4), dtype=torch.float32, device=torch.device("cpu"), seed=seed)


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("seed", [0, 3, 2**40, 2**63 - 2])
def test_increments_equal_torchsde(seed: int) -> None:
    torchsde = pytest.importorskip("torchsde")
    reference = torchsde.BrownianInterval(
        t0=0.0292, t1=14.6, size=(2, 3, 4), dtype=torch.float32, entropy=seed, tol=1e-6, pool_size=24, halfway_tree=True
    )
    ours = _tree(seed)
    midpoints = [((a * b) ** 0.5, a) for a, b in QUERIES]  # the second stages' half steps
    for ta, tb in [(b, a) for a, b in QUERIES] + midpoints + [(0.0292, 14.6), (1.0, 1.0), (0.01, 20.0)]:
        assert torch.equal(ours.increment(ta, tb), reference(ta, tb)), (ta, tb)


def test_path_does_not_depend_on_the_order_of_queries() -> None:
    forward, backward = _tree(), _tree()
    first = [forward.increment(b, a) for a, b in QUERIES]
    second = [backward.increment(b, a) for a, b in reversed(QUERIES)][::-1]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(first, second))
    # increments add up over adjacent intervals
    assert torch.allclose(forward.increment(0.4, 5.7), sum(first[2:6], torch.zeros(2, 3, 4)), atol=1e-5)


def test_increment_has_the_variance_of_its_interval() -> None:
    tree = BrownianTree(0.0, 4.0, shape=(200_000,), dtype=torch.float64, device=torch.device("cpu"), seed=1)
    assert tree.increment(1.0, 3.5).std().item() == pytest.approx(2.5**0.5, rel=0.01)


def test_invalid_intervals_raise() -> None:
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianTree(1.0, 1.0, shape=(1,), dtype=torch.float32, device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError, match="ta <= tb"):
        _tree().increment(3.0, 1.0)


def _sample(scheduler: DPMSolverSDEScheduler, seed: int) -> torch.Tensor:
    state = scheduler.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * state.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    for i, t in enumerate(state.timesteps):
        x = scheduler.step(state, fake_model(scheduler.scale_model_input(state, x, i), t), i, x, generator=generator)
    return x


def test_unseeded_path_follows_the_step_generator() -> None:
    scheduler = DPMSolverSDEScheduler(**SD)
    assert torch.equal(_sample(scheduler, 1), _sample(scheduler, 1))
    assert not torch.allclose(_sample(scheduler, 1), _sample(scheduler, 2))
    # a config seed fixes the path whatever the generator
    seeded = scheduler.replace(noise_sampler_seed=9)
    assert torch.equal(_sample(seeded, 1), _sample(seeded, 2))
