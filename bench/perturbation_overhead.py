"""What perturbing guiders cost a forward on the CPU: a plain forward of a small UNet, and a PAG step.

Times, on our UNet at a small config, (1) a plain forward of a model no perturbation has touched,
(2) a plain forward after a PAG step has run on the model (outside any perturbed pass), and
(3) one guided PAG step (cond and uncond batched, then the perturbed pass). A UNet forward is
milliseconds, so a shared machine's noise hides what a perturbation leaves on the plain path;
(4) times it where it is visible: one small ``nn.Linear`` call, untouched and with the idle
dispatchers a perturbation leaves on the modules it acts on.
Run: python bench/perturbation_overhead.py [--repeats 15] [--number 200]
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable

import torch

from diffblocks.components.guiders import PerturbedAttentionGuidance, guided_prediction
from diffblocks.components.models.unet import UNet2DConditionModel

CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 16,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def best_us(call: Callable[[], object], *, repeats: int, number: int) -> tuple[float, float]:
    """Median and best of ``repeats`` timings, in microseconds per call."""
    runs = [t / number * 1e6 for t in timeit.repeat(call, repeat=repeats, number=number)]
    return statistics.median(runs), min(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(CONFIG).eval()
    latents, timestep, text = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 5, 16)
    conditions = {"cond": {"encoder_hidden_states": text}, "uncond": {"encoder_hidden_states": torch.zeros_like(text)}}
    pag = PerturbedAttentionGuidance.for_family("sdxl", perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)

    def plain() -> object:
        return model(latents, timestep, text)

    def predict(x: torch.Tensor, *, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return model(x, timestep, encoder_hidden_states)

    def step() -> object:
        return guided_prediction(
            pag, state=None, predict=predict, latents=latents, conditions=conditions, step_index=1, num_steps=10, model=model
        )

    timing = {"repeats": args.repeats, "number": args.number}
    with torch.no_grad():
        untouched = best_us(plain, **timing)
        step()
        after = best_us(plain, **timing)
        guided = best_us(step, **timing)
    print(f"plain forward, model untouched:        median {untouched[0]:8.1f} µs, best {untouched[1]:8.1f} µs")
    print(f"plain forward, after a PAG step:       median {after[0]:8.1f} µs, best {after[1]:8.1f} µs")
    print(f"PAG step (batched cond+uncond, pert.): median {guided[0]:8.1f} µs, best {guided[1]:8.1f} µs")
    hooked = sum(bool(m._forward_pre_hooks) + bool(m._forward_hooks) for m in model.modules())
    print(f"hooks on the model after the PAG step: {hooked}")
    layer_us(repeats=args.repeats, number=args.number * 50)


def layer_us(*, repeats: int, number: int) -> None:
    """A small linear layer's call, untouched and carrying both idle dispatchers (before and after its forward)."""
    try:
        from diffblocks.components.guiders._seam import PerturbationHooks, install, remove
    except ImportError:  # a version that hooks per pass leaves nothing on the plain path
        return
    layer, x = torch.nn.Linear(16, 16), torch.randn(1, 16)
    hooks = PerturbationHooks()
    hooks.before[layer] = lambda *_: None
    hooks.after[layer] = lambda *_: None
    with torch.no_grad():
        untouched = best_us(lambda: layer(x), repeats=repeats, number=number)
        install(hooks)
        idle = best_us(lambda: layer(x), repeats=repeats, number=number)
        remove(layer)
    print(f"nn.Linear(16, 16) call, untouched:     median {untouched[0]:8.2f} µs, best {untouched[1]:8.2f} µs")
    print(f"  with both dispatchers, idle:         median {idle[0]:8.2f} µs, best {idle[1]:8.2f} µs")


if __name__ == "__main__":
    main()
