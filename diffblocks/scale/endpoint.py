"""The served endpoint: a Ray Serve deployment holding one :class:`RequestRunner` per replica.

``POST /generate`` takes a JSON :class:`GenerationRequest` and answers ``image/png`` (one image), or
JSON with base64 PNGs, the seeds and the request when the client accepts ``application/json``
(needed for ``num_images`` above 1); ``X-Batch-Size`` tells how many requests shared the pipeline call.
``GET /health`` answers 200 once the replica holds its model:
Serve routes to a replica only after its constructor, which loads the model, has returned.

A request is refused (422, the Python API's message) before it queues behind others: pydantic's
messages for its fields, the pipeline's :class:`InputError` for inputs the blocks refuse. Accepted
requests wait up to ``batch_wait_timeout_s`` for others, and those that share their settings
(:func:`~diffblocks.scale.together.batch_key`) run as one pipeline call in a worker thread, so the
replica keeps answering health checks and refusals meanwhile. Serve itself bounds the queue
(``max_ongoing_requests`` per replica, ``max_queued_requests`` waiting) and answers 503 beyond it.

Without ``from __future__ import annotations``: FastAPI reads the routes' annotations at run time.
This module imports Ray; :mod:`diffblocks.scale.serve` imports it only once Ray is known to be there.
"""

import asyncio
import base64
import io
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve

from diffblocks.blocks import InputError
from diffblocks.scale.request import GenerationRequest, RequestRunner
from diffblocks.scale.together import REFUSED, Outcome, run_batch

if TYPE_CHECKING:
    from PIL.Image import Image

_MSG_ONE_PNG = (
    "num_images {count} makes {count} images but image/png holds one; "
    'send "Accept: application/json" for base64 PNGs, or ask for one image'
)

app = FastAPI(title="diffblocks", description="Generate images from a JSON request; see docs/scale.md.")


# Serve pickles the deployment class by value when it is decorated, so what its methods use is defined above it


class _NotAcceptable(Exception):
    """The client accepts no media type that can carry the answer."""


def _wants_json(accept: str | None, count: int) -> bool:
    """JSON when the client accepts it (or anything) and PNG cannot carry the answer; PNG otherwise."""
    types = {part.split(";")[0].strip().lower() for part in (accept or "*/*").split(",")}
    if "application/json" in types:
        return True
    if count > 1:
        if types & {"*/*", "application/*"}:
            return True
        raise _NotAcceptable(_MSG_ONE_PNG.format(count=count))
    return False


def _refusal(error: Exception) -> JSONResponse:
    """422 with the Python API's message, and its problems one by one."""
    problems: list[dict[str, Any]]
    if isinstance(error, ValidationError):
        problems = [
            {"field": ".".join(str(part) for part in each["loc"]) or "request", "message": each["msg"]}
            for each in error.errors(include_url=False)
        ]
    elif isinstance(error, InputError):
        problems = [{"block": p.block, "field": p.field, "message": p.message, "fix": p.fix} for p in error.problems]
    else:
        problems = [{"field": "request", "message": str(error)}]
    return JSONResponse({"error": str(error), "problems": problems}, status_code=422)


def _pngs(images: "list[Image]") -> list[bytes]:
    """The images as PNG files' bytes."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


@serve.deployment
@serve.ingress(app)
class Generator:
    """One replica: a model loaded once, serving ``/generate`` and ``/health``."""

    def __init__(self, model: str | None, device: str | None, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.runner = RequestRunner.load(model, device=device)
        self.model = model if model is not None else "built-in"
        self._run_batch.set_max_batch_size(max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @app.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self.model}

    @app.post("/generate")
    async def generate(self, http: Request) -> Response:
        try:
            request = GenerationRequest.model_validate_json(await http.body())
            as_json = _wants_json(http.headers.get("accept"), request.num_images)
            self.runner.check(request)  # milliseconds: the blocks' checks, no model runs
        except REFUSED as error:
            return _refusal(error)
        except _NotAcceptable as error:
            return JSONResponse({"error": str(error)}, status_code=406)
        outcome = await self._run_batch(request)
        if outcome.error is not None:
            if isinstance(outcome.error, REFUSED):  # a value only known at run time
                return _refusal(outcome.error)
            return JSONResponse({"error": f"{type(outcome.error).__name__}: {outcome.error}"}, status_code=500)
        assert outcome.images is not None
        pngs = await asyncio.to_thread(_pngs, outcome.images)
        together = {"X-Batch-Size": str(outcome.together)}
        if as_json:
            return JSONResponse(
                {
                    "images": [base64.b64encode(png).decode("ascii") for png in pngs],
                    "seeds": [request.seed + k for k in range(request.num_images)],
                    "request": request.model_dump(),
                },
                headers=together,
            )
        return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(request.seed), **together})

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)  # replaced per deployment in __init__
    async def _run_batch(self, requests: list[GenerationRequest]) -> list[Outcome]:
        # a worker thread, so the event loop keeps answering health checks and refusals while the model
        # runs; Serve runs one batch at a time, and the runner serves one caller at a time
        return await asyncio.to_thread(run_batch, self.runner, requests)
