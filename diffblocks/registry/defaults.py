"""The default allowlists: our own components under diffusers' names, transformers' text models, pipeline formats."""

from __future__ import annotations

from diffblocks.registry.registry import Key, Registry

DIFFUSERS_FORMAT: Key = ("diffblocks", "DiffusersFormat")
"""The format of ``Pipeline.from_pretrained`` / ``save_pretrained`` / ``push_to_hub``: diffusers' folder layout."""

_OURS = {
    # models
    "UNet2DConditionModel": "diffblocks.components.models.unet:UNet2DConditionModel",
    "AutoencoderKL": "diffblocks.components.models.autoencoder_kl:AutoencoderKL",
    "FluxTransformer2DModel": "diffblocks.components.models.flux:FluxTransformer2DModel",
    "ControlNetModel": "diffblocks.components.models.controlnet:ControlNetModel",
    "ControlNetUnionModel": "diffblocks.components.models.controlnet:ControlNetUnionModel",
    "FluxControlNetModel": "diffblocks.components.models.controlnet:FluxControlNetModel",
    "MultiControlNetModel": "diffblocks.components.models.controlnet:MultiControlNetModel",
    "MultiControlNetUnionModel": "diffblocks.components.models.controlnet:MultiControlNetUnionModel",
    "FluxMultiControlNetModel": "diffblocks.components.models.controlnet:FluxMultiControlNetModel",
}
_SCHEDULERS = (
    "DDPMScheduler DDIMScheduler PNDMScheduler LMSDiscreteScheduler EulerDiscreteScheduler "
    "EulerAncestralDiscreteScheduler HeunDiscreteScheduler DPMSolverMultistepScheduler "
    "UniPCMultistepScheduler FlowMatchEulerDiscreteScheduler "
    "LCMScheduler TCDScheduler DPMSolverSDEScheduler FlowMatchHeunDiscreteScheduler "
    "DEISMultistepScheduler DPMSolverSinglestepScheduler KDPM2DiscreteScheduler KDPM2AncestralDiscreteScheduler "
    "EDMEulerScheduler"
).split()
_GUIDERS = (
    "ClassifierFreeGuidance ClassifierFreeZeroStarGuidance AdaptiveProjectedGuidance TangentialClassifierFreeGuidance "
    "PerturbedAttentionGuidance SkipLayerGuidance SmoothedEnergyGuidance AutoGuidance FrequencyDecoupledGuidance "
    "MagnitudeAwareGuidance"
).split()
# the built-in blocks, by the public module that exports them: saved block trees name them so
_BLOCKS = {
    "diffblocks.blocks.standard": (
        "AddMaskChannels BlendMaskedLatents DecodeImages PredictNoise PrepareGuidance PrepareImageLatents "
        "PrepareInpaintImages PrepareInpaintLatents PrepareLatents PrepareMaskLatents ScaleModelInput SchedulerStep "
        "SetImageTimesteps SetInpaintTimesteps SetTimesteps EncodeImagePrompt PrepareControlImage PredictControlledNoise"
    ),
    "diffblocks.blocks.sd": "EncodePrompt EncodePromptXL PrepareTimeIds",
    "diffblocks.blocks.flux": (
        "FluxDefaults PredictFlow FluxEncodePrompt PrepareFluxConditions PrepareFluxGuidance PrepareFluxImageLatents "
        "PrepareFluxLatents PreprocessFluxImage UnpackLatents FluxSetImageTimesteps FluxSetTimesteps "
        "PrepareFluxControlImage PredictControlledFlow EncodeFluxImagePrompt PreprocessFluxInpaintImages PrepareFluxMaskLatents "
        "BlendFluxMaskedLatents"
    ),
    "diffblocks.presets.tiny.blocks": "EncodeBertPrompt",
}
_TRANSFORMERS = (
    "CLIPTextModel CLIPTextModelWithProjection CLIPTokenizer CLIPTokenizerFast T5EncoderModel T5Tokenizer "
    "T5TokenizerFast BertModel BertTokenizer BertTokenizerFast"
).split()


def default_component_registry() -> Registry:
    """Components allowed by default; plugins add more under the ``diffblocks.components`` entry-point group."""
    registry = Registry("component", entry_point_group="diffblocks.components")
    for name, target in _OURS.items():
        registry.register(("diffusers", name), target)
        registry.register(("diffblocks", name), target)
    for name in _SCHEDULERS:
        registry.register(("diffusers", name), f"diffblocks.components.schedulers:{name}")
        registry.register(("diffblocks", name), f"diffblocks.components.schedulers:{name}")
    for name in _GUIDERS:
        registry.register(("diffusers", name), f"diffblocks.components.guiders:{name}")
        registry.register(("diffblocks", name), f"diffblocks.components.guiders:{name}")
    for name in _TRANSFORMERS:
        registry.register(("transformers", name), f"transformers:{name}")
    return registry


def default_block_registry() -> Registry:
    """Blocks that saved pipelines may name; plugins add more under the ``diffblocks.blocks`` entry-point group.

    The built-in blocks are registered as ``("diffblocks", class name)``.
    """
    registry = Registry("block", entry_point_group="diffblocks.blocks")
    for module, names in _BLOCKS.items():
        for name in names.split():
            registry.register(("diffblocks", name), f"{module}:{name}")
    return registry


def default_format_registry() -> Registry:
    """Pipeline formats; plugins add more under the ``diffblocks.formats`` entry-point group.

    The built-in format reads and writes diffusers' folder layout with the preset families, which
    sit above the blocks that use it: it is listed here as a module path, data that is imported on
    first use, so ``diffblocks.blocks`` finds it without importing ``diffblocks.presets``.
    """
    registry = Registry("pipeline format", entry_point_group="diffblocks.formats")
    registry.register(DIFFUSERS_FORMAT, "diffblocks.presets.format:DiffusersFormat")
    return registry
