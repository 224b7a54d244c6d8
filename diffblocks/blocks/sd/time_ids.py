"""SDXL's size and crop conditioning: ``time_ids`` beside the pooled text embedding."""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field
from torch import Tensor

from diffblocks.blocks.block import Block, BlockConfig, BlockIO, component
from diffblocks.blocks.fields import produced
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.models.unet import UNet2DConditionModel

Size = tuple[int, int]

_MSG_WIDTH = (
    "the UNet's add_embedding takes {expected} features but {count} time ids x {per_id} + pooled_embeds {pooled} "
    "= {passed}{hint}"
)


class PrepareTimeIds(Block):
    """Micro-conditioning of SDXL (Podell et al. 2023, sec. 2.2): sizes and crop corner as ``time_ids``.

    ``time_ids`` is ``original_size + crops_coords_top_left + target_size`` (6 numbers, height
    before width), or ``original_size + crops_coords_top_left + (aesthetic_score,)`` for models
    trained with an aesthetic score (the SDXL refiner). Sizes default to the run's height and width;
    each ``negative_*`` value defaults to its positive counterpart.
    """

    class Inputs(BlockIO):
        conditioning: Conditioning = produced(description="the prompt's embeddings")
        negative_conditioning: Conditioning = produced(description="the negative prompt's embeddings")
        height: int
        width: int
        original_size: Size | None = Field(None, description="(height, width) the image seems to come from (default: the run's)")
        crops_coords_top_left: Size = Field((0, 0), description="(top, left) of the crop the image seems cut from")
        target_size: Size | None = Field(None, description="(height, width) the image seems made for (default: the run's)")
        negative_original_size: Size | None = None
        negative_crops_coords_top_left: Size | None = None
        negative_target_size: Size | None = None
        aesthetic_score: float = Field(6.0, description="only for models with requires_aesthetics_score (the refiner)")
        negative_aesthetic_score: float = Field(2.5, description="only for models with requires_aesthetics_score")

    class Outputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning

    class Config(BlockConfig):
        requires_aesthetics_score: bool = False

    unet: UNet2DConditionModel = component(description="checks the width of the added embedding")

    def __call__(self, inputs: Inputs) -> Outputs:
        run = (inputs.height, inputs.width)
        original, target = inputs.original_size or run, inputs.target_size or run
        crops = inputs.crops_coords_top_left
        if self.config.requires_aesthetics_score:
            ids = (*original, *crops, inputs.aesthetic_score)
            negative_ids = (
                *(inputs.negative_original_size or original),
                *(inputs.negative_crops_coords_top_left or crops),
                inputs.negative_aesthetic_score,
            )
        else:
            ids = (*original, *crops, *target)
            negative_ids = (
                *(inputs.negative_original_size or original),
                *(inputs.negative_crops_coords_top_left or crops),
                *(inputs.negative_target_size or target),
            )
        self._check_width(len(ids), _pooled(inputs.conditioning))
        return self.Outputs(
            conditioning=_with_ids(inputs.conditioning, ids),
            negative_conditioning=_with_ids(inputs.negative_conditioning, negative_ids),
        )

    def _check_width(self, count: int, pooled: Tensor) -> None:
        params = self.unet.params
        if params.addition_time_embed_dim is None or params.projection_class_embeddings_input_dim is None:
            raise ValueError("this UNet has no text-time embedding (addition_embed_type 'text_time'); it is not an SDXL UNet")
        expected, per_id = params.projection_class_embeddings_input_dim, params.addition_time_embed_dim
        passed = per_id * count + pooled.shape[-1]
        if passed != expected:
            hint = ""
            if expected - passed == per_id:
                hint = "; the model expects 6 time ids: build the blocks with requires_aesthetics_score=False"
            elif passed - expected == per_id:
                hint = "; the model expects 5 time ids: build the blocks with requires_aesthetics_score=True"
            raise ValueError(
                _MSG_WIDTH.format(expected=expected, count=count, per_id=per_id, pooled=pooled.shape[-1], passed=passed, hint=hint)
            )


def _pooled(conditioning: Conditioning) -> Tensor:
    if conditioning.pooled_embeds is None:
        raise ValueError("the conditioning has no pooled_embeds, which SDXL's time ids go with: encode the prompt with EncodePromptXL")
    return conditioning.pooled_embeds


def _with_ids(conditioning: Conditioning, ids: tuple[float, ...]) -> Conditioning:
    pooled = _pooled(conditioning)
    time_ids = torch.tensor([ids], dtype=pooled.dtype, device=pooled.device).repeat(pooled.shape[0], 1)
    return replace(conditioning, time_ids=time_ids)


__all__ = ["PrepareTimeIds", "Size"]
