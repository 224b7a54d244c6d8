"""Batch generation on Ray Data: many prompts, one pipeline per worker, images written as they finish.

The rows (:mod:`diffblocks.scale.rows`) become a Ray dataset; ``map_batches`` sends batches of rows
to a pool of actors, each holding one :class:`RequestRunner` loaded once (one actor per GPU, or per
CPU worker). An actor writes each image as soon as it is made (to a temporary name, then renamed)
and returns the batch's manifest records; the driver writes them as a manifest part per batch and
merges the parts at the end (:mod:`diffblocks.scale.manifest`).

- Deterministic: image ``k`` of a row with seed ``s`` is seeded ``s + k`` on a CPU generator and
  each row runs alone, so an image does not depend on the number of workers or the batch size.
- Resumable: a run finds the rows already recorded with their files and makes only the others.
- Faults: an actor that dies is restarted and its batch redone (Ray's ``max_restarts`` and
  ``max_task_retries``); the batch's records reach the manifest only from the run that finished it,
  so nothing is recorded twice. A row that fails on its own (a bad size, an unknown guider) is
  recorded with its error and the others go on.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from diffblocks.scale.request import GenerationRequest, RequestRunner
from diffblocks.scale.rows import BatchRow, read_rows

if TYPE_CHECKING:
    from PIL.Image import Image

INSTALL_HINT = 'pip install -e ".[ray]"'

_MSG_NO_RAY = "batch generation runs on Ray, which is not installed here; install it with: " + INSTALL_HINT


class ImageRunner(Protocol):
    """What a worker needs of its runner: images for a request (:class:`RequestRunner` is one)."""

    def images(self, request: GenerationRequest) -> list[Image]: ...


@dataclass(frozen=True)
class WorkerStats:
    """What one actor made in a run: images and the seconds it spent making them (not starting up)."""

    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BatchSummary:
    """The outcome of :func:`generate_batch`: counts of this run, its time, and the manifest's path."""

    output: Path
    manifest: Path
    rows: int  # in the prompts
    skipped: int  # rows already done by an earlier run
    made: int  # rows made in this run
    failed: int  # rows recorded with an error in this run
    images: int  # images made in this run
    seconds: float
    workers: Mapping[str, WorkerStats] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.images} images from {self.made} rows in {self.seconds:.1f}s ({self.images_per_second:.2f} images/s), "
            f"{self.skipped} rows already done, {self.failed} failed; manifest: {self.manifest}"
        ]
        lines += [f"  {name}: {s.images} images, {s.images_per_second:.2f} images/s" for name, s in sorted(self.workers.items())]
        return "\n".join(lines)


def generate_batch(
    prompts: str | Path | Sequence[str | Mapping[str, Any]],
    output: str | Path,
    model: str | None = None,
    *,
    workers: int = 1,
    batch_size: int = 8,
    address: str | None = None,
    device: str | None = None,
    loader: Callable[[], ImageRunner] | None = None,
    cpus_per_worker: float = 1.0,
    retries: int = 3,
    progress: bool = True,
    **defaults: Any,
) -> BatchSummary:
    """Generate the images of every row of ``prompts`` into ``output`` on Ray; skip rows already done there.

    Args:
        prompts: a ``.txt`` (a prompt per line), ``.jsonl`` or ``.parquet`` file (a row per prompt,
            with optional :class:`GenerationRequest` fields), or the prompts and rows themselves.
        output: the folder for ``images/ROW-K.png`` and ``manifest.parquet``; on a cluster of several
            machines, a folder every machine sees at the same path.
        model: a Hub id or folder, loaded once per worker (None: the built-in tiny model).
        workers: actors in the pool: one GPU each where the cluster has GPUs, else ``cpus_per_worker``.
        batch_size: rows per ``map_batches`` batch (and per manifest part).
        address: the Ray cluster to join (None: the one this process is connected to, or a new local one).
        device: where the workers run the model (None: a GPU where the cluster has GPUs, else the CPU).
        loader: instead of ``model``, a function each worker calls once for its runner.
        retries: restarts of a dead actor, and retries of its batch, before the run fails.
        defaults: :class:`GenerationRequest` fields for rows that leave them out (``num_images``,
            ``num_inference_steps``, ``height``, ...); row ``k`` without a seed gets ``seed + k``.

    Example (it starts Ray, so it runs with ``docs/scale.md`` rather than as a doctest)::

        summary = generate_batch(["a red circle", {"prompt": "a blue square", "seed": 7}], "out", num_inference_steps=2)
        assert (summary.images, summary.failed) == (2, 0)
    """
    from diffblocks.scale.manifest import Manifest, error_record

    started = time.perf_counter()
    ray = _require_ray()
    _check_settings(workers=workers, batch_size=batch_size, cpus_per_worker=cpus_per_worker, retries=retries)
    if model is not None and loader is not None:
        raise ValueError("give model or loader, not both: the loader loads its own model")
    out = Path(output).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the output is a folder for images and the manifest")
    rows = read_rows(prompts, defaults)
    manifest = Manifest(out)
    done = manifest.done(rows, model)
    bad = [row for row in rows if row.error is not None and row.index not in done]
    manifest.write_part([error_record(row, row.error or "", worker=None, model=model) for row in bad])
    todo = [row for row in rows if row.request is not None and row.index not in done]
    records: list[dict[str, Any]] = []
    try:
        if todo:
            with _connected(ray, address):
                batches = _run(
                    ray, todo, output=out, model=model, loader=loader, workers=workers, batch_size=batch_size,
                    device=device, cpus_per_worker=cpus_per_worker, retries=retries, progress=progress,
                )
                for batch in batches:
                    manifest.write_part(batch)
                    records.extend(batch)
    finally:
        manifest.merge()
    return _summary(out, manifest.path, rows, done, bad, records, time.perf_counter() - started)


def _require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the extra's data part)
    except ImportError:
        raise ModuleNotFoundError(_MSG_NO_RAY) from None
    return ray


def _check_settings(*, workers: int, batch_size: int, cpus_per_worker: float, retries: int) -> None:
    for name, value in (("workers", workers), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not (cpus_per_worker > 0 and math.isfinite(cpus_per_worker)):
        raise ValueError(f"cpus_per_worker must be a positive number, got {cpus_per_worker}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")


@contextmanager
def _connected(ray: Any, address: str | None) -> Iterator[None]:
    """Join ``address`` (or start a local cluster) unless already connected; leave only what was started here."""
    if ray.is_initialized():
        yield
        return
    # a local cluster needs neither the dashboard nor uv's per-worker environments
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(address=address, include_dashboard=False if address is None else None, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def _run(
    ray: Any,
    todo: Sequence[BatchRow],
    *,
    output: Path,
    model: str | None,
    loader: Callable[[], ImageRunner] | None,
    workers: int,
    batch_size: int,
    device: str | None,
    cpus_per_worker: float,
    retries: int,
    progress: bool,
) -> Iterator[list[dict[str, Any]]]:
    """The records of each finished batch, in the order batches finish, with one progress bar over the images."""
    from tqdm.auto import tqdm

    gpus = ray.cluster_resources().get("GPU", 0) > 0 if device is None else device.startswith("cuda")
    if loader is None:
        loader = functools.partial(RequestRunner.load, model, device=device if device is not None else ("cuda" if gpus else "cpu"))
    items = [{"row": row.index, "request": row.request.model_dump_json() if row.request else "", "key": row.key} for row in todo]
    # one block per batch, and at least one batch per worker where there are rows enough; a worker
    # that would get no batch is not started (it would load the model for nothing)
    blocks = max(math.ceil(len(items) / batch_size), min(workers, len(items)))
    batch_size = math.ceil(len(items) / blocks)
    workers = min(workers, blocks)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_worker}
    with _quiet_ray_data(ray):
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for an actor's restarts and retries yet, and warns on the
            # remote arguments that carry them; without them Ray Data retries a dying row forever
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            made = dataset.map_batches(
                _Worker,
                fn_constructor_kwargs={"loader": loader, "output": str(output), "model": model, "threads": None if gpus else cpus_per_worker},
                batch_size=batch_size,
                # one batch in flight per actor: a batch waits for the next idle actor instead of queueing
                # behind a busy one, so the last batches do not run on one worker while the others idle
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                max_restarts=retries,
                max_task_retries=retries,
                **resources,
            )
        total = sum(row.request.num_images for row in todo if row.request is not None)
        with tqdm(total=total, unit="image", disable=not progress, desc="batch") as bar:
            # no prefetching: with it, a finished batch waits on the driver until the next one is
            # done, and a run stopped in between would make that batch again
            for batch in made.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                records = [json.loads(text) for text in batch["record"]]
                # a failed row counts its images as done too, so the bar ends full
                bar.update(sum(1 if record["error"] is None else record["num_images"] for record in records))
                yield records


@contextmanager
def _quiet_ray_data(ray: Any) -> Iterator[None]:
    """Turn off Ray Data's progress bars and notes for the run (ours counts images), then put them back."""
    context = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False, "print_on_execution_start": False}
    previous = {name: getattr(context, name) for name in settings}
    logger = logging.getLogger("ray.data._internal.progress")  # says once that the bars are off
    level = logger.level
    for name, value in settings.items():
        setattr(context, name, value)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(context, name, value)
        logger.setLevel(level)


class _Worker:
    """A Ray Data actor: loads its runner once, then makes a batch of rows at a time."""

    def __init__(self, loader: Callable[[], ImageRunner], output: str, model: str | None, threads: float | None) -> None:
        import torch
        from transformers.utils import logging as transformers_logging

        if threads is not None:  # as many torch threads as CPUs reserved, whatever the machine has
            torch.set_num_threads(max(1, int(threads)))
        transformers_logging.disable_progress_bar()  # the driver shows one bar for the run
        self.runner = loader()
        self.output = Path(output)
        self.model = model
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[str]]:
        records: list[dict[str, Any]] = []
        for index, request, key in zip(batch["row"], batch["request"], batch["key"]):
            row = BatchRow(int(index), GenerationRequest.model_validate_json(str(request)), None, str(key))
            records.extend(self._make(row))
        return {"record": [json.dumps(record) for record in records]}

    def _make(self, row: BatchRow) -> list[dict[str, Any]]:
        from diffblocks.blocks import InputError
        from diffblocks.scale.manifest import error_record, image_records

        assert row.request is not None
        started = time.perf_counter()
        try:
            images = self.runner.images(row.request)
        except (InputError, ValueError) as error:  # the row's own fault (pydantic's errors are ValueErrors)
            return [error_record(row, _one_line(error), worker=self.name, model=self.model)]
        files = [f"images/{row.index:06d}-{k}.png" for k in range(len(images))]
        for image, file in zip(images, files):
            _save(image, self.output / file)
        return image_records(row, files, seconds=time.perf_counter() - started, worker=self.name, model=self.model)


def _save(image: Image, path: Path) -> None:
    """Write ``image`` whole or not at all: a reader (or a resumed run) never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def _one_line(error: Exception) -> str:
    from diffblocks.blocks import InputError

    if isinstance(error, InputError):
        return "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in error.problems)
    return " ".join(str(error).split()) or type(error).__name__


def _summary(
    output: Path,
    manifest: Path,
    rows: Sequence[BatchRow],
    done: set[int],
    bad: Sequence[BatchRow],
    records: Sequence[dict[str, Any]],
    seconds: float,
) -> BatchSummary:
    made = {record["row"] for record in records}
    failed = {row.index for row in bad} | {record["row"] for record in records if record["error"] is not None}
    images: dict[str, int] = {}
    busy: dict[str, float] = {}
    for record in records:
        if record["file"] is not None:
            images[record["worker"]] = images.get(record["worker"], 0) + 1
            busy[record["worker"]] = busy.get(record["worker"], 0.0) + record["seconds"]
    return BatchSummary(
        output=output,
        manifest=manifest,
        rows=len(rows),
        skipped=len(done),
        made=len(made - failed),
        failed=len(failed),
        images=sum(images.values()),
        seconds=seconds,
        workers={name: WorkerStats(count, busy[name]) for name, count in images.items()},
    )
