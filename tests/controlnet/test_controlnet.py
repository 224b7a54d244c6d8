"""ControlNet for SD 1.5 and SDXL against diffusers' ControlNet pipelines on tiny random weights: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from diffblocks.components.models.controlnet import ControlNetModel
from diffblocks.presets.controlnet import with_controlnet
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

SIZE = 32


def tiny_controlnet(folder: Path, **changes: Any) -> Path:
    """A diffusers ControlNetModel shaped like the tiny UNets, with random (not zero) output convolutions."""
    import diffusers

    torch.manual_seed(1)
    net = diffusers.ControlNetModel(**{
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "norm_num_groups": 32,
        "conditioning_embedding_out_channels": (16, 32),
        **changes,
    })
    with torch.no_grad():
        for param in net.parameters():
            if not param.abs().sum():  # the zero convolutions: give them weights, so the control shows
                param.normal_(std=0.3)
    net.save_pretrained(folder)
    return folder


SD15_NET = dict(cross_attention_dim=32, attention_head_dim=8)
SDXL_NET = dict(
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * 8 + 32,
    cross_attention_dim=64,
)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("controlnet_sd15")
    return tiny_sd15(root / "sd15"), tiny_controlnet(root / "controlnet", **SD15_NET)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("controlnet_sdxl")
    return tiny_sdxl(root / "sdxl"), tiny_controlnet(root / "controlnet", **SDXL_NET)


def control_image(seed: int = 0, size: int = SIZE) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))


def run_both(ours: Pipeline, ref: Any, **kwargs: Any) -> tuple[Any, np.ndarray]:
    image = kwargs.pop("control_image")
    expected = ref(**kwargs, image=image, generator=torch.Generator().manual_seed(5), output_type="np").images
    out = ours(**kwargs, control_image=image, generator=torch.Generator().manual_seed(5), output_type="np", progress=False)
    return out, expected


def sd15_reference(repo: Path, net: Path) -> Any:
    import diffusers

    controlnet = diffusers.ControlNetModel.from_pretrained(net)
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(repo, controlnet=controlnet, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize(
    "settings",
    [
        dict(guidance_scale=6.0),
        dict(guidance_scale=6.0, controlnet_conditioning_scale=0.6, control_guidance_start=0.25, control_guidance_end=0.75),
        dict(guidance_scale=1.0),
    ],
    ids=["cfg", "scale-and-window", "no-cfg"],
)
def test_sd15_matches_diffusers(sd15: tuple[Path, Path], settings: dict[str, Any]) -> None:
    repo, net = sd15
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    ref = sd15_reference(repo, net)
    kwargs = dict(prompt=["a red circle", "a blue square"], negative_prompt=["blurry", "dark"], height=SIZE, width=SIZE,
                  num_inference_steps=4, control_image=control_image(), **settings)  # fmt: skip
    out, expected = run_both(ours, ref, **kwargs)
    assert out.workflow == "text2img" and out.images.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert np.abs(out.images - expected).max() < 1e-5
    plain = Pipeline.from_pretrained(str(repo))(**{k: v for k, v in kwargs.items() if "control" not in k},
        generator=torch.Generator().manual_seed(5), output_type="np", progress=False)  # fmt: skip
    assert np.abs(plain.images - expected).max() > 1e-3  # the control changes the image


def test_sd15_control_per_prompt_and_images_per_prompt(sd15: tuple[Path, Path]) -> None:
    repo, net = sd15
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    ref = sd15_reference(repo, net)
    kwargs = dict(prompt=["a red circle", "a blue square"], height=SIZE, width=SIZE, num_inference_steps=3,
                  num_images_per_prompt=2, control_image=[control_image(0), control_image(1)])  # fmt: skip
    out, expected = run_both(ours, ref, **kwargs)
    assert out.images.shape == (4, SIZE, SIZE, 3)
    assert np.abs(out.images - expected).max() < 1e-5


def test_sdxl_matches_diffusers(sdxl: tuple[Path, Path]) -> None:
    import diffusers

    repo, net = sdxl
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    controlnet = diffusers.ControlNetModel.from_pretrained(net)
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(repo, controlnet=controlnet, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0,
                  controlnet_conditioning_scale=0.8, control_image=control_image())  # fmt: skip
    out, expected = run_both(ours, ref, **kwargs)
    assert out.images.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(out.images - expected).max() < 1e-5


def test_img2img_runs_with_control(sd15: tuple[Path, Path]) -> None:
    repo, net = sd15
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    out = ours(prompt="x", image=control_image(3), strength=0.5, num_inference_steps=2, control_image=control_image(),
               output_type="np", progress=False)  # fmt: skip
    assert out.workflow == "img2img" and out.images.shape == (1, SIZE, SIZE, 3)


# --- bad input -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlled(sd15: tuple[Path, Path]) -> Pipeline:
    repo, net = sd15
    return with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))


def test_control_image_of_another_size_is_resized(controlled: Pipeline) -> None:
    small = controlled(prompt="x", height=SIZE, width=SIZE, num_inference_steps=2, control_image=control_image(size=12),
                       output_type="np", progress=False)  # fmt: skip
    assert small.images.shape == (1, SIZE, SIZE, 3)


def test_control_image_of_another_batch_is_refused(controlled: Pipeline) -> None:
    with pytest.raises(InputError, match="control_image has 3 images but the run has 2 prompt"):
        controlled(prompt=["a", "b"], height=SIZE, width=SIZE, num_inference_steps=2,
                   control_image=[control_image(i) for i in range(3)], progress=False)  # fmt: skip


def test_start_after_end_is_refused_before_any_work(controlled: Pipeline) -> None:
    with pytest.raises(InputError, match="control_guidance_start 0.8 is after control_guidance_end 0.2"):
        controlled(prompt="x", num_inference_steps=2, control_image=control_image(), control_guidance_start=0.8,
                   control_guidance_end=0.2, progress=False)  # fmt: skip


def test_controlnet_of_another_family_is_refused_when_added(sd15: tuple[Path, Path], sdxl: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"the ControlNet \(SDXL.*does not fit the UNet \(SD 1.x/2.x"):
        with_controlnet(Pipeline.from_pretrained(str(sd15[0])), ControlNetModel.from_pretrained(sdxl[1]))


def test_the_base_pipeline_is_unchanged(sd15: tuple[Path, Path], controlled: Pipeline) -> None:
    base = Pipeline.from_pretrained(str(sd15[0]))
    with_controlnet(base, ControlNetModel.from_pretrained(sd15[1]))
    assert "control_image" not in base.input_names and "control_image" in controlled.input_names


# --- several ControlNets ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    return tiny_controlnet(tmp_path_factory.mktemp("controlnet_b"), **SD15_NET, conditioning_channels=1)


def test_two_controlnets_match_diffusers(sd15: tuple[Path, Path], second_net: Path) -> None:
    import diffusers

    repo, net = sd15
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), [ControlNetModel.from_pretrained(p) for p in (net, second_net)])
    nets = [diffusers.ControlNetModel.from_pretrained(p) for p in (net, second_net)]
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(repo, controlnet=nets, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    gray = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=5.0,
                  controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.5],
                  control_image=[control_image(), gray])  # fmt: skip
    out, expected = run_both(ours, ref, **kwargs)
    assert np.abs(out.images - expected).max() < 1e-5


def test_several_controlnets_refuse_a_scale_list_of_another_length(sd15: tuple[Path, Path]) -> None:
    repo, net = sd15
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), [ControlNetModel.from_pretrained(net)] * 2)
    with pytest.raises(InputError, match="controlnet_conditioning_scale has 3 values but there are 2 ControlNets"):
        ours(prompt="x", num_inference_steps=2, control_image=[control_image()] * 2, controlnet_conditioning_scale=[1.0] * 3, progress=False)
    with pytest.raises(InputError, match="control_image must be a list of 2 control images"):
        ours(prompt="x", num_inference_steps=2, control_image=control_image(), progress=False)


def test_inpaint_runs_with_control(controlled: Pipeline) -> None:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    out = controlled(prompt="x", image=control_image(3), mask_image=PIL.Image.fromarray(mask), num_inference_steps=2,
                     control_image=control_image(), output_type="np", progress=False)  # fmt: skip
    assert out.workflow == "inpaint" and out.images.shape == (1, SIZE, SIZE, 3)


def test_under_a_memory_budget_the_step_reserves_the_residuals_and_the_image_stays(sd15: tuple[Path, Path]) -> None:
    from diffblocks.components import ComponentsManager

    repo, net = sd15
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=2, control_image=control_image(),
                  generator=torch.Generator().manual_seed(5), output_type="np", progress=False)  # fmt: skip
    plain = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))(**kwargs)
    manager = ComponentsManager(device="cpu", memory_budget="1GiB")
    ours = with_controlnet(Pipeline.from_pretrained(str(repo), manager=manager), ControlNetModel.from_pretrained(net))
    kwargs["generator"] = torch.Generator().manual_seed(5)
    out = ours(**kwargs)
    assert np.array_equal(out.images, plain.images)
    assert "KiB of ControlNet residuals held through it" in str(manager.plan())
