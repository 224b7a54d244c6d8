"""Room for a denoiser step's activations, reserved from the size a call runs at.

A manager given ``memory_budget=`` alone knows its models' sizes before it loads them, but not
the size of the image a call will ask for, and that is what a step's activations grow with (a Flux
step at 1024² makes about 1 GiB of them). So the denoiser wrappers say it at every forward
(:func:`reserve_step`): the input's shape, the text tokens, the batch of that forward (images times
the guidance passes run at once), the attention backend the model would use, and the dtype.

For a size not seen before, :func:`~diffblocks.components.memory.steps.step_bytes` estimates the
step's activations; when that is more than the plan reserves, the manager plans again with it
(a tighter policy, or fewer blocks kept on the device) before the forward runs, and
``manager.plan()`` says what it reserved and why. The reservation only grows: a smaller call
after a larger one keeps the larger plan, rather than moving weights back and forth between
calls. An explicit ``activations=`` wins: then no model is watched here.

A ControlNet's residuals are made before the denoiser's forward and held through it: their bytes
join the step's (``held=``). The cost per forward of a watched model is one weak-dictionary lookup,
one context-variable read for the backend, a look at each residual's storage and one set lookup;
an unwatched model (no budget) pays the lookup alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import final
from weakref import WeakKeyDictionary

from torch import Tensor, nn

from diffblocks.components.attention import attention_backend_for
from diffblocks.components.memory.sizes import ByteSize
from diffblocks.components.memory.steps import StepShape, step_bytes


@final
@dataclass(frozen=True)
class StepNeed:
    """The activations one denoiser step is estimated to need, and why (``manager.plan()`` shows both)."""

    nbytes: ByteSize
    why: str


Grow = Callable[[StepNeed], None]
"""Told of a step that needs more than any step before it (the manager plans again there)."""


@final
class _Watch:
    __slots__ = ("grow", "name", "seen")

    def __init__(self, name: str, grow: Grow) -> None:
        self.name, self.grow = name, grow
        self.seen: set[tuple[object, ...]] = set()  # the sizes already estimated: each once


_WATCHED: WeakKeyDictionary[nn.Module, _Watch] = WeakKeyDictionary()


def watch_steps(model: nn.Module, name: str, grow: Grow | None) -> None:
    """Tell ``grow`` of each step of ``model`` (named ``name``) at a size not seen before; None stops watching."""
    if grow is None:
        _WATCHED.pop(model, None)
    else:
        _WATCHED[model] = _Watch(name, grow)


def held_bytes(tensors: Iterable[Tensor] | None) -> int:
    """Bytes held by ``tensors`` (a ControlNet's residuals), each storage once: one tensor handed to several blocks counts once.

    A tensor without a real storage to tell apart (on the meta device, a tensor subclass) counts its own bytes.
    """
    seen: dict[tuple[str, int], int] = {}
    alone = 0
    for tensor in tensors or ():
        if type(tensor) is not Tensor or tensor.device.type == "meta":
            alone += tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values()) + alone


def reserve_step(
    model: nn.Module, x: Tensor, shape: Callable[[], StepShape], *, text_tokens: int = 0, held: Iterable[Tensor] | None = None
) -> None:
    """Before a forward of ``model`` on ``x``: make sure its manager's plan reserves the step's activations.

    Args:
        model: the denoiser's model (a watched one: its manager plans under a budget).
        x: the forward's input; its first dimension is the batch of the forward (guidance passes
            batched included), its dtype the activations'.
        shape: the widest attention layer at this size, computed only for a size not seen before
            (:func:`~diffblocks.components.memory.steps.unet_shape`, :func:`~diffblocks.components.memory.steps.flux_tokens_shape`).
        text_tokens: the prompt's tokens, where they change the estimate (Flux attends over them jointly).
        held: tensors made before the forward and held through it besides the model's own (a
            ControlNet's residuals): their bytes are added to the step. The ControlNet's own forward
            runs before, when the denoiser's activations are not yet made, and needs less than they do.

    A size the estimate cannot read (refused by ``shape``) reserves nothing: the forward reports its own error.

    Example:
        >>> import torch
        >>> from diffblocks.components.memory.steps import StepShape
        >>> model, needs = torch.nn.Linear(4, 4), []
        >>> watch_steps(model, "denoiser", needs.append)
        >>> for _ in range(2):   # the second forward at this size estimates nothing
        ...     reserve_step(model, torch.ones(2, 64, 4), lambda: StepShape(tokens=64, channels=4, heads=1))
        >>> [str(need.nbytes) for need in needs]
        ['45.0 KiB']
    """
    watch = _WATCHED.get(model)
    if watch is None:
        return
    backend = attention_backend_for(model)
    extra = held_bytes(held)
    key = (tuple(x.shape), text_tokens, x.dtype, backend, extra)
    if key in watch.seen:
        return
    watch.seen.add(key)
    try:
        step = shape()
    except ValueError:
        return
    batch = int(x.shape[0])
    need = ByteSize(step_bytes(step, batch=batch, backend=backend, itemsize=x.element_size()) + extra)
    why = (f"a step of {watch.name} with {batch} sample(s) at once (images x guidance passes batched), "
           f"{step.tokens} tokens of {step.channels} channels at its widest attention, {backend} attention, "
           f"{str(x.dtype).removeprefix('torch.')}")
    if extra:
        why += f", and {ByteSize(extra)} of ControlNet residuals held through it"
    watch.grow(StepNeed(need, why))
