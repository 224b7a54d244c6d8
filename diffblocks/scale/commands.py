"""The ``batch`` and ``serve`` commands of ``diffblocks``: their arguments, and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


# --- batch -----------------------------------------------------------------------------------------------


def add_batch(commands: Any) -> None:
    batch = commands.add_parser(
        "batch",
        help="make the images of many prompts on Ray workers, resumably (needs the ray extra)",
        description="Generate every prompt of a .txt, .jsonl or .parquet file on Ray Data workers (docs/scale.md).",
    )
    batch.add_argument("prompts", type=Path, help="a .txt file (a prompt per line), .jsonl or .parquet (a row per prompt)")
    batch.add_argument("-o", "--output", type=Path, required=True, help="folder for images/ and manifest.parquet")
    batch.add_argument("--model", default=None, help="a Hub id or folder of a supported family (default: built-in)")
    batch.add_argument("--seed", type=int, default=0, help="row k without a seed uses seed + k (default: 0)")
    batch.add_argument("--num-images", type=int, default=None, help="images per row without its own (default: 1)")
    batch.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    batch.add_argument("--size", type=int, default=None, help="square size in pixels (sets --height and --width)")
    batch.add_argument("--height", type=int, default=None, help="height in pixels (default: the model's own)")
    batch.add_argument("--width", type=int, default=None, help="width in pixels (default: the model's own)")
    batch.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    batch.add_argument("--guider", default=None, help="guidance rule by class name, e.g. AdaptiveProjectedGuidance")
    batch.add_argument("--scheduler", default=None, help="sampler by class name, configured from the model's config")
    batch.add_argument("--negative-prompt", default=None, help="what to steer away from")
    batch.add_argument("--workers", type=int, default=1, help="Ray actors, one GPU or one CPU each (default: 1)")
    batch.add_argument("--batch-size", type=int, default=8, help="rows per batch and manifest part (default: 8)")
    batch.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto (default: a local one)")
    batch.add_argument("--device", default=None, help="where workers run (default: a GPU if the cluster has one)")
    batch.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    batch.set_defaults(run=_batch)


def _batch(args: argparse.Namespace) -> int:
    """Run ``batch``; bad arguments or prompts print one line and return 2, Ctrl-C says how to resume."""
    from diffblocks.scale import generate_batch

    try:
        if args.size is not None:
            if args.height is not None or args.width is not None:
                raise ValueError("give --size or --height/--width, not both")
            args.height = args.width = args.size
        summary = generate_batch(
            args.prompts,
            args.output,
            args.model,
            workers=args.workers,
            batch_size=args.batch_size,
            address=args.address,
            device=args.device,
            progress=not args.no_progress,
            seed=args.seed,
            num_images=args.num_images,
            num_inference_steps=args.steps,
            height=args.height,
            width=args.width,
            guidance_scale=args.guidance,
            guider=args.guider,
            scheduler=args.scheduler,
            negative_prompt=args.negative_prompt,
        )
    except KeyboardInterrupt:
        print(f"diffblocks batch: interrupted; run the same command again to finish {args.output}", file=sys.stderr)
        return 130
    except (ValueError, OSError, ModuleNotFoundError) as error:  # ModuleNotFoundError: no Ray
        print(f"diffblocks batch: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(summary)
    return 0


# --- serve ------------------------------------------------------------------------------------------------


def add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP on Ray Serve (needs the ray extra)",
        description="Serve POST /generate (JSON in; a PNG, or JSON with base64 PNGs, out) and GET /health "
        "on a local Ray cluster until Ctrl-C. See docs/scale.md.",
    )
    serve.add_argument("--model", default=None, help="a Hub id or folder of a supported family (default: built-in)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one (default: 8000)")
    serve.add_argument("--replicas", type=int, default=1, help="model copies, one CPU or GPU each (default: 1)")
    serve.add_argument("--max-batch-size", type=int, default=4, help="requests run as one call (default: 4)")
    serve.add_argument("--max-queued", type=int, default=64, help="waiting requests before 503 (default: 64)")
    serve.add_argument("--device", default=None, help="the replicas' device (default: cuda on a GPU replica, else cpu)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    """Run ``serve`` until Ctrl-C; bad options or a missing Ray print one line and return 2."""
    from pydantic import ValidationError

    from diffblocks.scale import serve

    try:
        serve(
            args.model,
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            max_batch_size=args.max_batch_size,
            max_queued_requests=args.max_queued,
            device=args.device,
            blocking=True,
        )
    except ValidationError as error:
        message = "; ".join(_option_problem(each) for each in error.errors(include_url=False))
    except ModuleNotFoundError as error:
        message = str(error)
    except RuntimeError as error:  # Serve could not deploy, e.g. a replica failed to load the model
        message = str(error).strip().splitlines()[0]
    except KeyboardInterrupt:  # Ctrl-C before the replicas were ready: serve() has already cleaned up
        return 130
    else:
        return 0
    print(f"diffblocks serve: error: {message}", file=sys.stderr)
    return 2


def _option_problem(error: Any) -> str:
    """One refused serve option, named by its flag."""
    field = str(error["loc"][0]) if error["loc"] else ""
    flag = {"max_queued_requests": "max-queued"}.get(field, field.replace("_", "-"))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"--{flag}: {message}" if flag else message


__all__ = ["add_batch", "add_serve"]
