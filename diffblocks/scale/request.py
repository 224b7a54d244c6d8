"""One image request and the runner that turns it into images on a loaded pipeline.

``diffblocks generate``, a batch row and a served request are the same :class:`GenerationRequest`, so
the three accept the same fields and refuse bad ones with the same messages. Images are seeded one by
one (image ``k`` of a request with seed ``s`` uses a CPU generator seeded ``s + k``), so an image does
not depend on which worker made it or what else ran beside it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from PIL.Image import Image

    from diffblocks.blocks import Pipeline
    from diffblocks.blocks.output import PipelineOutput

MAX_IMAGES_PER_REQUEST = 64

_MSG_MIXED_SAMPLERS = (
    "{chosen} cannot sample this model: it was trained for {kind} ({current}); pick a {kind} scheduler"
)


class GenerationRequest(BaseModel):
    """What to generate: a prompt and the settings that may differ from one image request to the next.

    Sizes, steps and the guidance scale left as None take the model's own defaults; ``guider`` and
    ``scheduler`` name a class of the guider and scheduler registries (``"AdaptiveProjectedGuidance"``,
    ``"EulerDiscreteScheduler"``), configured from the model's current ones.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    guider: str | None = None
    scheduler: str | None = None

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value} (it would turn every pixel into NaN)")
        return value

    @field_validator("guider")
    @classmethod
    def _known_guider(cls, value: str | None) -> str | None:
        from diffblocks.components.guiders import GUIDERS

        if value is not None and value not in GUIDERS:
            raise ValueError(f"unknown guider {value!r}; known: {', '.join(sorted(GUIDERS))}")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        from diffblocks.components.schedulers import SCHEDULERS

        if value is not None and value not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; known: {', '.join(sorted(SCHEDULERS))}")
        return value

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image: image ``k`` equals a single image made with ``seed + k``, on any device."""
        return [torch.Generator().manual_seed(self.seed + k) for k in range(self.num_images)]


class RequestRunner:
    """Runs requests on one pipeline, swapping its guider or scheduler for a request that names one.

    The pipeline's own guider and scheduler are put back after each such request, so requests do not
    leak settings into each other. One runner serves one caller at a time.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    @classmethod
    def load(cls, model: str | None = None, *, device: str | None = None, dtype: torch.dtype | None = None) -> RequestRunner:
        """Load ``model`` (a Hub id or folder; None: the built-in model) on ``device`` (None: the default)."""
        from diffblocks.blocks import Pipeline
        from diffblocks.components.devices import default_device

        if model is None:
            from diffblocks.presets.tiny.preset import builtin_model_dir

            model = str(builtin_model_dir())
        kwargs: dict[str, Any] = {"device": device if device is not None else str(default_device())}
        if dtype is not None:
            kwargs["dtype"] = dtype
        return cls(Pipeline.from_pretrained(model, **kwargs))

    @property
    def embeds_guidance(self) -> bool:
        """Whether the guidance scale is the model's own input (Flux) rather than the guider's scale."""
        preset = self.pipe.preset
        return preset is not None and preset.family == "flux"

    def run(self, request: GenerationRequest, *, progress: bool = False, **extra: Any) -> PipelineOutput:
        """Run one request; ``extra`` inputs (e.g. ``image=`` for image-to-image) go to the pipeline as they are.

        An ``extra`` input the request also sets replaces the request's (requests run together pass their
        prompts and generators this way).
        """
        swapped = self._swaps(request)
        previous = {name: self.pipe.components[name] for name in swapped}
        if swapped:
            self.pipe.update_components(**swapped)
        try:
            return self.pipe(**(self.call_inputs(request) | extra), progress=progress)
        finally:
            if swapped:
                self.pipe.update_components(**previous)

    def images(self, request: GenerationRequest) -> list[Image]:
        """The request's images; refuses NaN or infinite latents, which would decode to black images."""
        out = self.run(request)
        latents = out.get("latents")
        if isinstance(latents, torch.Tensor) and not bool(torch.isfinite(latents).all()):
            raise ValueError(
                "the run produced NaN or infinite latents, so every image would be black. "
                "Try a lower guidance scale, float32 weights, or another scheduler"
            )
        return list(out.images)

    def check(self, request: GenerationRequest) -> None:
        """Refuse ``request`` as its run would, before any heavy work.

        Raises what the run would raise: ``ValueError`` for a guider or scheduler that cannot serve this
        model, the pipeline's :class:`InputError` for its inputs (e.g. a size the VAE cannot take).
        """
        self._swaps(request)
        self.pipe.check(**self.call_inputs(request))

    def call_inputs(self, request: GenerationRequest) -> dict[str, Any]:
        """The pipeline inputs of ``request``: the prompt, one generator per image, and the settings it gives."""
        uses_guider_scale = request.guider is None or self.embeds_guidance
        inputs: dict[str, Any] = {
            "prompt": request.prompt,
            "num_images_per_prompt": request.num_images,
            "generator": request.generators(),
        }
        optional = {
            "num_inference_steps": request.num_inference_steps,
            "height": request.height,
            "width": request.width,
            "negative_prompt": request.negative_prompt,
            "guidance_scale": request.guidance_scale if uses_guider_scale else None,
        }
        inputs.update({name: value for name, value in optional.items() if value is not None})
        return inputs

    def _swaps(self, request: GenerationRequest) -> dict[str, Any]:
        """The guider and scheduler ``request`` asks for, configured from the pipeline's current ones."""
        from diffblocks.components.guiders import FAMILIES as GUIDER_FAMILIES
        from diffblocks.components.guiders import GUIDERS
        from diffblocks.components.schedulers import (
            SCHEDULERS,
            FlowMatchEulerDiscreteScheduler,
            FlowMatchHeunDiscreteScheduler,
        )

        swaps: dict[str, Any] = {}
        if request.scheduler is not None:
            current = self.pipe.components["scheduler"]
            chosen = SCHEDULERS[request.scheduler]
            flow = (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)
            flow_model = isinstance(current, flow)
            if flow_model != issubclass(chosen, flow):
                kind = "flow matching" if flow_model else "noise prediction"
                raise ValueError(_MSG_MIXED_SAMPLERS.format(chosen=request.scheduler, kind=kind, current=type(current).__name__))
            swaps["scheduler"] = chosen.from_config(current.to_config())
        if request.guider is not None:
            cls = GUIDERS[request.guider]
            embedded = self.embeds_guidance
            settings: dict[str, Any] = {}
            if "guidance_scale" not in cls.model_fields and request.guidance_scale is not None and not embedded:
                raise ValueError(f"guidance_scale: {request.guider} has no guidance scale")
            preset = self.pipe.preset
            family = preset.family if preset is not None and preset.family in GUIDER_FAMILIES else None
            if "family" in cls.model_fields and family is not None:
                # guiders that perturb the denoiser take their default layers (and, on Flux, scales) from the family
                settings["family"] = family
            # the scale: the request's, else the current guider's; on Flux the request's scale is the model's
            # own input, and a guider with family settings keeps the family's scale
            scale = None if embedded else request.guidance_scale
            if scale is None and not (embedded and "family" in settings):
                scale = getattr(self.pipe.components["guider"], "guidance_scale", None)
            if scale is not None and "guidance_scale" in cls.model_fields:
                settings["guidance_scale"] = scale
            swaps["guider"] = cls(**settings)
        return swaps
