"""Bad inputs to the SD 1.5 and SDXL presets fail before any model runs, naming the block and the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from diffblocks.registry.registry import RegistryError
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

SIZE = 32
IMAGE = PIL.Image.fromarray(np.full((SIZE, SIZE, 3), 128, dtype=np.uint8))
MASK = np.ones((SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    make = tiny_sd15 if request.param == "sd15" else tiny_sdxl
    return request.param, make(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def pipe(family: tuple[str, Path]) -> Pipeline:
    return Pipeline.from_pretrained(str(family[1]))


@pytest.fixture
def model_calls(pipe: Pipeline) -> Iterator[list[str]]:
    """Names of the models that ran during the test (bad inputs must leave it empty)."""
    calls: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    ]
    yield calls
    for handle in handles:
        handle.remove()


class CudaGenerator(torch.Generator):
    """A CPU generator that reports a CUDA device (a real one cannot be made on this machine)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda")


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    (dict(height=33), r"\[workflow\.text2img\.prepare_latents\] height: height 33 is not a positive multiple of 2"),
    (dict(image=IMAGE, width=30 + 1), r"\[workflow\.img2img\.prepare_latents\] width: width 31 is not a positive multiple"),
    (dict(image=IMAGE, mask_image=MASK, height=17), r"\[workflow\.inpaint\.prepare_images\] height: height 17"),
    (dict(image=IMAGE, strength=1.5), r"\[workflow\.img2img\.set_timesteps\] strength: Input should be less than or equal to 1"),
    (dict(image=IMAGE, strength=0.0), r"\[workflow\.img2img\.set_timesteps\] strength: Input should be greater than 0"),
    (dict(image=IMAGE, strength=0.1), r"\[workflow\.img2img\.set_timesteps\] strength: strength 0\.1 runs int\(4 \* 0\.1\) = 0"),
    (dict(image=IMAGE, mask_image=MASK, strength=-1.0), r"\[workflow\.inpaint\.set_timesteps\] strength: Input should be greater"),
    (dict(image=IMAGE, mask_image=MASK[:16]), r"\[workflow\.inpaint\.prepare_images\] mask_image: mask_image is 16x32 but image"),
    (dict(mask_image=MASK), r"\[workflow\.inpaint\.prepare_images\] image: is required but was not given"),
    (dict(generator=CudaGenerator()), r"\[workflow\.text2img\.prepare_latents\] generator: generator is on 'cuda'"),
    (dict(image=IMAGE, mask_image=MASK, generator=[CudaGenerator()]), r"\[workflow\.inpaint\.prepare_latents\] generator"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), r"negative_prompt: negative_prompt has 1 entries but prompt has 2"),
    (dict(prompt=[]), r"prompt: prompt is an empty list"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt: Input should be greater than or equal to 1"),
    (dict(output_type="jpeg"), r"\[decode_images\] output_type: Input should be 'pil', 'np', 'pt' or 'latent'"),
    (dict(guidance_scale=-1.0), r"\[workflow\.text2img\.prepare_guidance\] guidance_scale: Input should be greater"),
    # values that would poison the run: infinities, NaN, complex latents, images in another range
    (dict(guidance_scale=float("inf")), r"\[workflow\.text2img\.prepare_guidance\] guidance_scale: Input should be a finite number"),
    (dict(latents=torch.zeros(1, 4, 16, 16, dtype=torch.complex64)), r"latents: .*expected a float tensor, got dtype torch\.complex64"),
    (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), r"latents: .*holds 1024 NaN or infinite values of 1024"),
    (dict(image=np.full((SIZE, SIZE, 3), 200.0, dtype=np.float32)), r"image: image is a float array with values in \[200, 200\].*x / 255"),
    (dict(image=torch.full((1, 3, SIZE, SIZE), -0.5)), r"image: .*float tensor with values in \[-0\.5, -0\.5\].*\(x \+ 1\) / 2"),
    (dict(image=np.zeros((SIZE, SIZE, 3), dtype=np.int64)), r"image: image is a int64 array, whose range is not known"),
    (dict(image=PIL.Image.new("F", (SIZE, SIZE), 200.0)), r"image: image is a PIL 'F' image with values in \[200, 200\]"),
    (dict(image=IMAGE, mask_image=MASK * 255), r"\[workflow\.inpaint\.prepare_images\] mask_image: mask_image is a float array"),
    # counts that depend on the batch are checked before the text encoders run
    (dict(generator=[torch.Generator()] * 3), r"\[workflow\.text2img\.prepare_latents\] generator: 3 generators for 1 images \(1 prompts x"),
    (dict(prompt=["a", "b"], num_images_per_prompt=2, generator=[torch.Generator()] * 2), r"2 generators for 4 images"),
    (dict(image=[IMAGE] * 3, prompt=["a", "b"]), r"\[workflow\.img2img\.prepare_latents\] image: 3 images for 2 images \(2 prompts"),
    (dict(image=[IMAGE] * 2, mask_image=MASK), r"\[workflow\.inpaint\.prepare_images\] image: 2 images for 1 images"),
    (dict(image=IMAGE, mask_image=MASK, generator=[torch.Generator()] * 2), r"\[workflow\.inpaint\.prepare_latents\] generator: 2 generators"),
    (dict(clip_skip=5), r"\[encode_prompt\] clip_skip: clip_skip 5 skips more layers than the text encoder has \(2 layers"),
    # sizes and batches that would allocate for minutes (or exhaust memory) are refused with the estimate
    (dict(height=100_000, width=32), r"\[workflow\.text2img\.prepare_latents\] height: height 100000 is larger than 16384 pixels"),
    (dict(height=16384, width=16384), r"height: an image of 16384x16384 needs 64\.0 GiB in one activation of the VAE decoder, more than 32\.0 GiB; use at most about 11584x11584"),
    (dict(height=4096, width=4096, num_images_per_prompt=64), r"num_images_per_prompt: 64 images of 4096x4096 need 256\.0 GiB .* make at most 8 images of this size per call"),
    (dict(prompt=["a"] * 100_000, num_images_per_prompt=64), r"num_images_per_prompt: 6400000 image\(s\) of 32x32 need a latent tensor of 6,553,600,000 elements"),
    (dict(image=IMAGE, height=16384, width=16384), r"\[workflow\.img2img\.prepare_latents\] height: an image of 16384x16384 needs"),
    (dict(image=IMAGE, mask_image=MASK, height=16384, width=16384), r"\[workflow\.inpaint\.prepare_images\] height: an image of 16384x16384"),
]


@pytest.mark.parametrize(("inputs", "message"), BAD_INPUTS, ids=[m.split("]")[0].strip("\\[") + f"-{i}" for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_fails_before_any_model_runs(pipe: Pipeline, model_calls: list[str], inputs: dict[str, Any], message: str) -> None:
    call = {"prompt": "a red circle", "num_inference_steps": 4, "progress": False, **inputs}
    with pytest.raises(InputError, match=message):
        pipe(**call)
    assert model_calls == []


def test_a_call_after_every_bad_input_gives_the_same_image(pipe: Pipeline) -> None:
    call = {"prompt": "a red circle", "num_inference_steps": 2, "output_type": "pt", "progress": False}
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    for inputs, _ in BAD_INPUTS:
        with pytest.raises(InputError):
            pipe(**{**call, **inputs})
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(before, after)


def test_unknown_scheduler_class_is_a_registry_error(family: tuple[str, Path], tmp_path: Path) -> None:
    import shutil

    repo = Path(shutil.copytree(family[1], tmp_path / "repo"))
    index = json.loads((repo / "model_index.json").read_text())
    (repo / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "FancyScheduler"]}))
    config = json.loads((repo / "scheduler" / "scheduler_config.json").read_text())
    (repo / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "FancyScheduler"}))
    with pytest.raises(RegistryError, match=r"component diffusers\.FancyScheduler is not allowed\. Allowed components: .*diffusers\.EulerDiscreteScheduler"):
        Pipeline.from_pretrained(str(repo))


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_every_output_type(pipe: Pipeline, output_type: str) -> None:
    out = pipe(prompt="a red circle", num_inference_steps=1, height=SIZE, width=SIZE, output_type=output_type, progress=False)
    if output_type == "pil":
        assert isinstance(out.images, list) and out.images[0].size == (SIZE, SIZE)
    elif output_type == "np":
        assert isinstance(out.images, np.ndarray) and out.images.shape == (1, SIZE, SIZE, 3)
    elif output_type == "pt":
        assert isinstance(out.images, torch.Tensor) and out.images.shape == (1, 3, SIZE, SIZE)
        assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    else:
        assert out.images.shape == (1, 4, SIZE // 2, SIZE // 2)


def test_inpainting_unet_without_a_mask_fails_before_any_work(tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(tiny_sd15(tmp_path / "inpaint", in_channels=9)))
    with pytest.raises(InputError, match="the UNet takes 9 input channels, not the VAE's 4: it is an inpainting model"):
        pipe(prompt="a cat", num_inference_steps=2, progress=False)


def test_float64_weights_load_and_run(family: tuple[str, Path]) -> None:
    pipe = Pipeline.from_pretrained(str(family[1]), dtype=torch.float64)
    assert next(pipe.components["unet"].parameters()).dtype == torch.float64
    out = pipe(prompt="a red circle", num_inference_steps=1, output_type="pt", progress=False)
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize(("options", "message"), [
    (dict(dtype=torch.int8), r"dtype torch\.int8 is not one of .*integer weights come from a quantizer"),
    pytest.param(dict(device="cuda"), r"device 'cuda': CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA")),
])
def test_unusable_dtype_or_device_fails_when_the_pipeline_is_built(family: tuple[str, Path], options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pipeline.from_pretrained(str(family[1]), **options)
