"""The ``diffblocks`` command line."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

import torch

from diffblocks.blocks import Block, BlockIO, Float, Loop, Pipeline, component
from diffblocks.blocks import Sequence as BlockSequence


def _env(_: argparse.Namespace) -> int:
    """Print the environment and check that the core works end to end on this machine."""
    import importlib.metadata as md

    from diffblocks import __version__
    from diffblocks.registry import COMPONENTS

    print(f"diffblocks {__version__} on Python {platform.python_version()} ({platform.machine()})")
    for package in ("torch", "transformers", "huggingface-hub", "safetensors", "pydantic", "accelerate"):
        try:
            print(f"  {package:<16} {md.version(package)}")
        except md.PackageNotFoundError:
            print(f"  {package:<16} not installed")
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    print(f"  accelerator      {accelerator}")
    allowed = sorted(f"{lib}.{name}" for lib, name in COMPONENTS)
    print(f"  components       {len(allowed)} allowlisted (diffusers, transformers and diffblocks names)")
    print(f"self-check: {_self_check()}")
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffblocks", description="Compose diffusion pipelines from typed blocks.")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="show versions and devices, and run a self-check")
    env.set_defaults(run=_env)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
