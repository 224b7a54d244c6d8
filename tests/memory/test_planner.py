"""The planner picks the cheapest policy that fits; budgets parse or fail by name."""

from __future__ import annotations

import pytest

from diffblocks.components.memory import (
    ByteSize,
    GroupOffload,
    LeafOffload,
    MemoryBudgetError,
    ModelOffload,
    ModelSize,
    NoOffload,
    plan_memory,
)

GIB = 2**30
# Flux.1-dev in bf16, roughly: a 23.8 GB transformer (19 + 38 blocks), T5-XXL 9.5 GB (24 blocks), CLIP-L, the VAE
FLUX = {
    "transformer": ModelSize(int(22.2 * GIB), blocks=((int(0.63 * GIB),) * 19, (int(0.26 * GIB),) * 38), largest_leaf=int(0.14 * GIB)),
    "text_encoder_2": ModelSize(int(8.9 * GIB), blocks=((int(0.35 * GIB),) * 24,), largest_leaf=int(0.23 * GIB)),
    "text_encoder": ModelSize(int(0.23 * GIB), blocks=((int(0.013 * GIB),) * 12,), largest_leaf=int(0.09 * GIB)),
    "vae": ModelSize(int(0.16 * GIB), blocks=((int(0.02 * GIB),) * 8,), largest_leaf=int(0.01 * GIB)),
}


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("80GiB", NoOffload()),           # 31.5 GiB in all
        ("32GiB", NoOffload()),
        ("24GiB", ModelOffload()),        # the transformer alone: 22.2 GiB
        ("12GiB", GroupOffload(1)),       # 0.9 GiB outside the blocks + two 0.63 GiB double blocks (one running, one fetched ahead)
        ("2.2GiB", GroupOffload(1)),
        ("2.1GiB", GroupOffload(1, prefetch=False)),  # one double block at a time
        ("1.6GiB", GroupOffload(1, prefetch=False)),
        ("1.5GiB", LeafOffload()),        # the largest layer: 0.23 GiB
        ("0.25GiB", LeafOffload()),
    ],
)
def test_the_cheapest_policy_that_fits(budget: str, expected: object) -> None:
    plan = plan_memory(FLUX, device="cuda", budget=ByteSize.parse(budget))
    assert plan.policy == expected
    assert plan.peak <= ByteSize.parse(budget)
    assert [policy for policy, _ in plan.tried] == [NoOffload(), ModelOffload(), GroupOffload(1), GroupOffload(1, prefetch=False), LeafOffload()]
    assert f"-> {expected!r}" in str(plan)


def test_a_budget_below_every_placement_says_the_minimum() -> None:
    with pytest.raises(MemoryBudgetError, match=r"memory budget 100.0 MiB on cuda is below .* LeafOffload\(\) needs at least 235.5 MiB"):
        plan_memory(FLUX, device="cuda", budget=ByteSize.parse("100MiB"))


def test_a_given_policy_is_checked_against_the_budget() -> None:
    assert plan_memory(FLUX, device="cuda", budget=None, policy=ModelOffload()).policy == ModelOffload()
    with pytest.raises(MemoryBudgetError, match=r"ModelOffload\(\) needs at least 22.2 GiB"):
        plan_memory(FLUX, device="cuda", budget=ByteSize.parse("12GiB"), policy=ModelOffload())


def test_no_budget_keeps_every_model_on_the_device() -> None:
    assert plan_memory(FLUX, device="cuda").policy == NoOffload()


@pytest.mark.parametrize(
    ("text", "size"),
    [("12GiB", 12 * GIB), ("12 GiB", 12 * GIB), ("8GB", 8 * 10**9), ("1.5gib", int(1.5 * GIB)), ("512MiB", 2**29),
     ("100", 100), ("100B", 100), (4096, 4096), ("2TiB", 2 * 2**40), ("3kb", 3000)],
)
def test_sizes_parse(text: str | int, size: int) -> None:
    assert ByteSize.parse(text) == size


@pytest.mark.parametrize("text", ["twelve", "12 GiBs", "12XB", "-1GiB", "", "1e9", "GiB"])
def test_unparseable_sizes_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size: write a number and a unit, such as '12GiB'"):
        ByteSize.parse(text)


def test_negative_and_odd_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        ByteSize.parse(-1)
    with pytest.raises(ValueError, match="not a size"):
        ByteSize.parse(True)
    with pytest.raises(ValueError, match="not a size"):
        ByteSize.parse(1.5)  # type: ignore[arg-type]  # what a caller might pass by mistake


def test_sizes_show_in_binary_units() -> None:
    assert [str(ByteSize(n)) for n in (0, 1023, 1024, 3 * 2**20, 12 * GIB, 3 * 2**40)] == [
        "0 B", "1023 B", "1.0 KiB", "3.0 MiB", "12.0 GiB", "3.0 TiB"
    ]


def test_group_offload_keeps_blocks_on_the_device_in_the_spare_budget() -> None:
    plan = plan_memory(FLUX, device="cuda", budget=ByteSize.parse("12GiB"))
    streamed = GroupOffload(1).peak(list(FLUX.values()))
    assert plan.policy == GroupOffload(1) and plan.kept == {"transformer": 12 * GIB - streamed}  # the largest model first
    assert plan.peak == 12 * GIB
    assert "and up to 9.8 GiB of transformer's repeated blocks stay on the device (whole groups), in the spare budget" in str(plan)
    roomy = plan_memory(FLUX, device="cuda", budget=ByteSize.parse("26GiB"), ladder=(GroupOffload(1),))
    assert roomy.kept["transformer"] == sum(sum(each) for each in FLUX["transformer"].blocks)  # all of it, then the next model
    assert 0 < roomy.kept["text_encoder_2"] <= roomy.budget - roomy.peak + roomy.kept["text_encoder_2"]
    assert plan_memory(FLUX, device="cuda", budget=ByteSize.parse("12GiB"), keep=False).kept == {}
    assert plan_memory(FLUX, device="cuda", budget=ByteSize.parse("24GiB")).kept == {}  # ModelOffload keeps nothing extra
