"""Auto-guidance: guide away from a weaker version of the model, emulated by skipping or dropping layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, final

from pydantic import PrivateAttr, model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.guiders.base import COND, COND_ONLY, GuidancePass, GuiderState
from diffblocks.components.guiders.families import AUTO_GUIDANCE_SETTINGS, SKIP_LAYERS
from diffblocks.components.guiders.perturbations import SkipBlocks
from diffblocks.components.guiders.perturbed import AbstractPerturbedGuider, LayerPaths
from diffblocks.components.guiders.rules import guide


@final
class AutoGuidance(AbstractPerturbedGuider):
    """Auto-guidance, Karras et al. (2024), arXiv:2406.02507.

    ``weak + s * (cond - weak)`` where ``weak`` is the prediction of a degraded model. As diffusers
    does, the weak model is this model with the chosen blocks skipped (``dropout=1``) or their
    outputs randomly dropped out (``dropout<1``), and it is run on the unconditional inputs
    (``weak_condition="uncond"``: CFG and auto-guidance in one term). ``weak_condition="cond"`` is
    the paper's form, where both predictions share the prompt.

    ``family="flux"`` implies ``weak_condition="cond"`` and ``guidance_scale=2.8`` unless given:
    Flux.1-dev runs without a negative prompt, and auto-guidance is then its only guidance term.

    Args:
        auto_guidance_layers: block paths, or block lists; defaults to the ``family``'s.
        dropout: 1.0 skips the blocks; below 1 drops that fraction of their outputs.
        weak_condition: inputs of the weak prediction, ``"uncond"`` (diffusers) or ``"cond"`` (paper).
        family: ``"sd15"``, ``"sdxl"``, ``"flux"`` or ``"tiny"``.
        (other fields): as :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.
    """

    layers_field: ClassVar[str] = "auto_guidance_layers"
    layer_config_key: ClassVar[str] = "auto_guidance_config"
    default_layers: ClassVar[dict[str, tuple[str, ...]]] = dict(SKIP_LAYERS)
    family_settings: ClassVar[Mapping[str, Mapping[str, object]]] = AUTO_GUIDANCE_SETTINGS

    auto_guidance_layers: LayerPaths = None
    dropout: float = 1.0
    weak_condition: Literal["cond", "uncond"] = "uncond"
    _guided: tuple[GuidancePass, ...] = PrivateAttr()

    @model_validator(mode="after")
    def _build_passes(self) -> Self:
        self._guided = (COND, GuidancePass(self.weak_condition, self.perturbation))
        return self

    def make_perturbation(self, layers: tuple[str, ...]) -> SkipBlocks:
        return SkipBlocks(layers, dropout=self.dropout)

    def layer_config_settings(self) -> dict[str, object]:
        return {"skip_attention": True, "skip_attention_scores": False, "skip_ff": True, "dropout": self.dropout}

    def passes(self, step_index: int, num_steps: int) -> tuple[GuidancePass, ...]:
        return self._guided if self.guides(step_index, num_steps) else COND_ONLY

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        if not self.guides(step_index, num_steps):
            return predictions[0]
        cond, weak = predictions
        guided = guide(cond, weak, self.guidance_scale, use_original_formulation=self.use_original_formulation)
        return self._rescaled(guided, cond)


__all__ = ["AutoGuidance"]
