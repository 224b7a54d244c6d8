"""Run a compiled plan: a flat walk over steps, with nothing per step a hand-written loop would not do."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from diffblocks.blocks.block import BlockIO
from diffblocks.blocks.plan import LoopStep, Step
from diffblocks.components.memory.oom import Relieve, Reliefs, run_relieved

State = dict[str, Any]
_PROGRESS_INTERVAL = 0.1  # seconds between progress-bar refreshes; tqdm.update per step costs more than a block


@dataclass(slots=True)
class StepInfo:
    """What a step callback sees after each loop iteration.

    ``state`` is the live pipeline state (read it freely). Return a mapping from a callback to
    replace state values; call :meth:`interrupt` to stop the loop cleanly (the blocks after the
    loop still run, so a partial result is decoded).
    """

    step_index: int
    num_steps: int
    t: Any
    state: Mapping[str, Any]
    loop: str
    _run: RunContext

    def interrupt(self) -> None:
        self._run.interrupted = True


Callback = Callable[[StepInfo], Mapping[str, Any] | None]


@dataclass
class RunContext:
    """Per-call options and flags."""

    callbacks: tuple[Callback, ...] = ()
    progress: bool = True
    timings: dict[str, float] | None = None
    interrupted: bool = False
    sync: Callable[[], None] | None = None
    current: str = field(default="", repr=False)
    relieve: Relieve | None = None  # after a step runs out of memory: make room, then the step runs again


_new = object.__new__
_set_dict = object.__setattr__
# BaseModel's own slots, written directly: pydantic's __setattr__ would validate, and this runs per step
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def construct(cls: type[BlockIO], values: dict[str, Any]) -> BlockIO:
    """Build already-valid block inputs without re-validating them (they were checked when built or on entry)."""
    obj = _new(cls)
    _set_dict(obj, "__dict__", values)
    _set_fields_set(obj, set(values))
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


def run_steps(steps: tuple[Step | LoopStep, ...], state: State, run: RunContext) -> None:
    """Run steps in order, updating ``state`` in place."""
    if run.timings is not None:
        return _run_timed(steps, state, run)
    for step in steps:
        if type(step) is LoopStep:
            _run_loop(step, state, run)
        else:
            _run_step(step, state, run)
    return None


def _run_step(step: Step, state: State, run: RunContext) -> None:
    """The one place a block runs: read its inputs from the state, call it, write its outputs back."""
    run.current = step.path
    if run.relieve is None:
        out = step.block(construct(step.input_cls, {name: state[name] for name in step.inputs}))
    else:
        out = _run_relieved(step, state, run.relieve)
    if type(out) is not step.output_cls:
        _bad_output(step, out)
    state.update(out.__dict__)


def _run_relieved(step: Step, state: State, relieve: Relieve) -> Any:
    """Run ``step``; after an out-of-memory error, while ``relieve`` makes room, run it again from the same inputs.

    A block writes its outputs to the state only when it returns, so the failed try changed nothing
    there; but it may have drawn from a random generator it was given, so each try after the first
    starts from the generators' states before the first (the image is the one no error would give).
    """
    generators = _generators(state[name] for name in step.inputs)
    before = [g.get_state() for g in generators]
    tries = 0

    def run() -> Any:
        nonlocal tries
        if tries:
            for generator, saved in zip(generators, before, strict=True):
                generator.set_state(saved)
        tries += 1
        return step.block(construct(step.input_cls, {name: state[name] for name in step.inputs}))

    # the step's components offer their reliefs (a guider: its passes one by one) first, then the manager's
    return run_relieved(run, Reliefs(relieve), where=step.path)


def _generators(values: Iterable[Any]) -> list[torch.Generator]:
    """The random generators among a step's inputs (one, or a list of one per image)."""
    found: list[torch.Generator] = []
    for value in values:
        if isinstance(value, torch.Generator):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Generator))
    return found


def _run_loop(step: LoopStep, state: State, run: RunContext) -> None:
    loop = step.loop
    sequence = state[loop.over]
    count = len(sequence)
    state[loop.count] = count
    body = step.body
    bar = tqdm(total=count, desc=step.path, leave=True) if run.progress else None
    shown, last = 0, time.monotonic()
    try:
        for i in range(count):
            if run.interrupted:
                break
            t = sequence[i]
            state[loop.index] = i
            state[loop.item] = t
            run_steps(body, state, run)
            if run.callbacks:
                _call_back(run, StepInfo(i, count, t, state, step.path, run), state)
            if bar is not None:
                now = time.monotonic()
                if now - last >= _PROGRESS_INTERVAL:
                    bar.update(i + 1 - shown)
                    shown, last = i + 1, now
    finally:
        if bar is not None:
            bar.update(min(count, state[loop.index] + 1 if count else 0) - shown)
            bar.close()


def _run_timed(steps: tuple[Step | LoopStep, ...], state: State, run: RunContext) -> None:
    for step in steps:
        start = time.perf_counter()
        if type(step) is LoopStep:
            _run_loop(step, state, run)
        else:
            _run_step(step, state, run)
        _add_time(run, step.path, start)


def _add_time(run: RunContext, path: str, start: float) -> None:
    if run.sync is not None:
        run.sync()
    assert run.timings is not None
    run.timings[path] = run.timings.get(path, 0.0) + time.perf_counter() - start


def _call_back(run: RunContext, info: StepInfo, state: State) -> None:
    for callback in run.callbacks:
        updates = callback(info)
        if updates:
            unknown = [name for name in updates if name not in state]
            if unknown:
                raise KeyError(
                    f"step callback {getattr(callback, '__name__', callback)!r} returned unknown state names {unknown}; "
                    f"it can replace: {sorted(state)}"
                )
            for name, value in updates.items():
                problem = replacement_problem(state[name], value)
                if problem is not None:
                    raise ValueError(
                        f"step callback {getattr(callback, '__name__', callback)!r} replaced {name!r} "
                        f"at step {info.step_index}: {problem}"
                    )
            state.update(updates)


def replacement_problem(old: object, new: object) -> str | None:
    """Why ``new`` cannot take ``old``'s place in the state, or None.

    The blocks after a callback trust the state as the plan typed it: a tensor is replaced by a
    tensor of the same shape, dtype and device (cheap to compare, no device sync), anything else by
    a value of its type.
    """
    if isinstance(old, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            return f"it was a tensor, the callback gave {type(new).__name__}; return a tensor like it"
        was = (tuple(old.shape), old.dtype, old.device)
        now = (tuple(new.shape), new.dtype, new.device)
        if was != now:
            return (
                f"it was a {old.dtype} tensor of shape {was[0]} on {old.device}, the callback gave a {new.dtype} tensor "
                f"of shape {now[0]} on {new.device}; return one like it (x.to(old) keeps dtype and device)"
            )
        return None
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return None
    if old is not None and not isinstance(new, type(old)):
        return f"it was a {type(old).__name__}, the callback gave {type(new).__name__}"
    return None


def _bad_output(step: Step, out: object) -> None:
    raise TypeError(
        f"block {step.path!r} returned {type(out).__name__}, not its declared Outputs: "
        f"end __call__ with `return self.Outputs(...)` ({step.block.declaration_site()})"
    )


def add_location_note(err: BaseException, run: RunContext, workflow: str) -> None:
    """Say where in the pipeline a failure happened (Python 3.11+ exception notes)."""
    if sys.version_info >= (3, 11) and run.current:
        err.add_note(f"while running block {run.current!r} of workflow {workflow!r}")


def cuda_sync() -> Callable[[], None] | None:
    """A synchronising function for honest per-block timings when CUDA is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return None
