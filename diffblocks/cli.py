"""The ``diffblocks`` command line: ``env`` (versions and a self-check), ``generate`` (text to image),
``batch`` (many prompts on Ray workers) and ``serve`` (HTTP)."""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from diffblocks.blocks import Block, BlockIO, Float, Loop, Pipeline, component
from diffblocks.blocks import Sequence as BlockSequence
from diffblocks.scale.commands import add_batch, add_serve


def _env(_: argparse.Namespace) -> int:
    """Print the environment and check that the core works end to end on this machine."""
    import importlib.metadata as md

    from diffblocks._version import __version__
    from diffblocks.components.devices import default_device
    from diffblocks.registry import COMPONENTS

    print(f"diffblocks {__version__} on Python {platform.python_version()} ({platform.machine()})")
    for package in ("torch", "transformers", "huggingface-hub", "safetensors", "pydantic", "accelerate"):
        try:
            print(f"  {package:<16} {md.version(package)}")
        except md.PackageNotFoundError:
            print(f"  {package:<16} not installed")
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    print(f"  accelerator      {accelerator}")
    print(f"  default device   {default_device()}")
    allowed = sorted(f"{lib}.{name}" for lib, name in COMPONENTS)
    print(f"  components       {len(allowed)} allowlisted (diffusers, transformers and diffblocks names)")
    attention_ok, attention = _attention_check()
    print(f"  attention        {attention}")
    core = _self_check()
    print(f"self-check: {core if attention_ok else 'FAILED (attention: see above)'}")
    return 0 if attention_ok and core.startswith("ok") else 1


def _attention_check() -> tuple[bool, str]:
    """The attention backend the environment selects, tried once on a small input as every model would call it."""
    import os

    try:
        from diffblocks.components.attention import attention, attention_backend
        from diffblocks.components.attention._state import ENV_BACKEND, backend_from_env, checks_from_env

        name = backend_from_env(os.environ)
        checks_from_env(os.environ)
        q = torch.randn(1, 2, 4, 8)
        with attention_backend(name):
            out = attention(q, q, q)
        source = f"from {ENV_BACKEND}" if os.environ.get(ENV_BACKEND, "").strip() else "the default"
        if not torch.isfinite(out).all():
            return False, f"FAILED: {name} ({source}) returned non-finite values"
        return True, f"{name} ({source}), works"
    except (ValueError, ImportError, RuntimeError) as error:  # every model would fail the same way
        return False, f"FAILED: {str(error).strip().splitlines()[0]}"


class _Start(Block):
    """Self-check: a schedule and starting latents."""

    class Inputs(BlockIO):
        steps: int = 4

    class Outputs(BlockIO):
        timesteps: torch.Tensor
        latents: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(timesteps=torch.linspace(1, 0, inputs.steps), latents=torch.ones(1, 4, 8, 8))


class _Denoise(Block):
    """Self-check: one model call per step."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        t: torch.Tensor

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    model: torch.nn.Module = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(latents=self.model(inputs.latents) * (1 + inputs.t))


def _self_check() -> str:
    """Build and run a small pipeline: plan checking, validation, the loop and the components manager."""
    pipe = Pipeline(BlockSequence(_Start(), Loop(_Denoise()), name="self_check"), {"model": torch.nn.Identity()})
    out = pipe(steps=4, progress=False)
    expected = torch.ones(1, 4, 8, 8) * torch.prod(1 + torch.linspace(1, 0, 4))
    ok = out.workflow == "default" and torch.allclose(out.latents, expected)
    return "ok (plan, validation, loop, components)" if ok else "FAILED"


# --- generate ---------------------------------------------------------------------------------------------


class CommandError(Exception):
    """A problem with the command's arguments, reported as one line."""


def _add_generate(commands: Any) -> None:
    generate = commands.add_parser(
        "generate",
        help="make an image from a prompt (default: the built-in tiny model, offline, on the CPU)",
        description="Generate images from a prompt with the built-in tiny model or any supported model.",
    )
    generate.add_argument("prompt", help='what to draw, e.g. "a red circle above a blue square"')
    generate.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="image file (default: out.png)")
    generate.add_argument("--model", default=None, help="a Hub id or folder of a supported family (default: built-in)")
    generate.add_argument("--seed", type=int, default=0, help="image k of --num-images uses seed + k (default: 0)")
    generate.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    generate.add_argument("--size", type=int, default=None, help="square size in pixels (sets --height and --width)")
    generate.add_argument("--height", type=int, default=None, help="height in pixels (default: the model's own)")
    generate.add_argument("--width", type=int, default=None, help="width in pixels (default: the model's own)")
    generate.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's; 1 = off)")
    generate.add_argument("--guider", default=None, help="guidance rule by class name, e.g. AdaptiveProjectedGuidance")
    generate.add_argument("--scheduler", default=None, help="sampler by class name, configured from the model's config")
    generate.add_argument("--num-images", type=int, default=1, help="writes OUT.png, OUT-1.png, OUT-2.png, ...")
    generate.add_argument("--negative-prompt", default=None, help="what to steer away from")
    generate.add_argument("--image", type=Path, default=None, help="start from this image (image-to-image)")
    generate.add_argument("--strength", type=float, default=None, help="with --image: how much to change it, in (0, 1]")
    generate.add_argument(
        "--device", default=None, help='where to run, e.g. "cuda" (default: the first of CUDA, NPU, XPU, MPS, CPU found)'
    )
    generate.add_argument(
        "--memory-budget", default=None,
        help='GPU memory the weights may take, e.g. "8GiB" or "auto" (90%% of what is free); models are offloaded to fit',
    )
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    generate.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    """Run ``generate``; errors in the arguments, the model or the inputs print one line and return 2."""
    from pydantic import ValidationError

    from diffblocks.blocks import InputError, PlanError
    from diffblocks.registry import RegistryError

    try:
        return _run_generate(args)
    except InputError as error:
        message = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in error.problems)
    except PlanError as error:
        message = "; ".join(p.message for p in error.problems)
    except ValidationError as error:  # settings a component refused, e.g. a guider without a layer default
        message = f"{error.title}: " + "; ".join(problem["msg"] for problem in error.errors())
    except (CommandError, ValueError, OSError, RegistryError, ModuleNotFoundError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"diffblocks generate: error: {message}", file=sys.stderr)
    return 2


def _check_arguments(args: argparse.Namespace) -> None:
    from diffblocks.components.guiders import GUIDERS
    from diffblocks.components.schedulers import SCHEDULERS

    if args.guider is not None and args.guider not in GUIDERS:
        raise CommandError(f"unknown guider {args.guider!r}; known: {', '.join(sorted(GUIDERS))}")
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise CommandError(f"unknown scheduler {args.scheduler!r}; known: {', '.join(sorted(SCHEDULERS))}")
    if args.size is not None:
        if args.height is not None or args.width is not None:
            raise CommandError("give --size or --height/--width, not both")
        args.height = args.width = args.size
    for name in ("steps", "num_images", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    for name in ("guidance", "strength"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CommandError(f"--{name} must be a finite number, got {value} (it would turn every pixel into NaN)")
    if args.strength is not None and args.image is None:
        raise CommandError("--strength needs --image")


def _run_generate(args: argparse.Namespace) -> int:
    _check_arguments(args)
    from diffblocks.blocks import Pipeline
    from diffblocks.scale import RequestRunner

    started = time.perf_counter()
    model = args.model if args.model is not None else str(_builtin_model())
    device = args.device
    if device is None:
        from diffblocks.components.devices import default_device

        device = str(default_device())
        print(f"device: {device} (the first found of cuda, npu, xpu, mps, cpu; --device to choose)")
    request = _request(args)
    manager = None
    if args.memory_budget is not None:
        from diffblocks.components import ComponentsManager

        manager = ComponentsManager(device=device, memory_budget=args.memory_budget)
    with _quiet_transformers():
        runner = RequestRunner(Pipeline.from_pretrained(model, device=device, manager=manager))
        out = runner.run(request, progress=not args.no_progress, **_image_inputs(args))
    _check_finite(out)
    paths = _output_paths(args.output, len(out.images))
    for image, path in zip(out.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"wrote {path}")
    print(f"{len(paths)} image{'s' if len(paths) > 1 else ''} in {time.perf_counter() - started:.1f}s ({out.workflow})")
    return 0


def _check_finite(out: Any) -> None:
    """Refuse to write images from NaN or infinite latents: they decode to black, which is not a result."""
    latents = out.get("latents")
    if isinstance(latents, torch.Tensor) and not bool(torch.isfinite(latents).all()):
        raise CommandError(
            "the run produced NaN or infinite latents, so every image would be black; nothing was written. "
            "Try a lower --guidance, float32 weights, or another --scheduler"
        )


def _builtin_model() -> Path:
    from diffblocks.presets.tiny.preset import builtin_model_dir

    return builtin_model_dir()


_FLAGS = {"num_images": "num-images", "num_inference_steps": "steps", "guidance_scale": "guidance", "negative_prompt": "negative-prompt"}
"""The command's flag for each request field whose name differs from it."""


def _request(args: argparse.Namespace) -> Any:
    """The arguments as the request that batch rows and served calls are too; a value it refuses is named by its flag."""
    from pydantic import ValidationError

    from diffblocks.scale import GenerationRequest

    try:
        return GenerationRequest(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            num_images=args.num_images,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            guider=args.guider,
            scheduler=args.scheduler,
        )
    except ValidationError as error:
        problems = [
            f"--{_FLAGS.get(str(each['loc'][0]), str(each['loc'][0]))}: {each['msg']}" if each["loc"] else each["msg"]
            for each in error.errors(include_url=False)
        ]
        raise CommandError("; ".join(problems)) from None


def _image_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """``image`` (and ``strength``) for image-to-image, read from ``--image``."""
    if args.image is None:
        return {}
    from PIL import Image

    with Image.open(args.image) as image:
        inputs: dict[str, Any] = {"image": image.convert("RGB")}
    if args.strength is not None:
        inputs["strength"] = args.strength
    return inputs


def _output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for the first image, then ``out-1.png``, ``out-2.png``, ..."""
    return [output] + [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(1, count)]


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load progress bars (a second bar beside ours), restoring the setting after."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffblocks", description="Compose diffusion pipelines from typed blocks.")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="show versions and devices, and run a self-check")
    env.set_defaults(run=_env)
    _add_generate(commands)
    add_batch(commands)
    add_serve(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
