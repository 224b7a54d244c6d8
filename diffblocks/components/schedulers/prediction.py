"""Turning a model's prediction into a clean-sample estimate, and Imagen's dynamic thresholding."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

PredictionType = Literal["epsilon", "sample", "v_prediction"]


def data_prediction(
    prediction_type: PredictionType,
    model_output: Float[Tensor, "batch *rest"],
    sample: Float[Tensor, "batch *rest"],
    *,
    alpha: float | Tensor,
    sigma: float | Tensor,
) -> Float[Tensor, "batch *rest"]:
    """Estimate ``x0`` of ``sample = alpha * x0 + sigma * eps`` (variance preserving).

    ``v_prediction`` is ``v = alpha * eps - sigma * x0`` (Salimans & Ho, 2022). ``alpha`` and
    ``sigma`` may be 0-d tensors, for schedulers that keep diffusers' float32 coefficients.
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output


def noise_prediction(
    prediction_type: PredictionType,
    model_output: Float[Tensor, "batch *rest"],
    sample: Float[Tensor, "batch *rest"],
    *,
    alpha: float,
    sigma: float,
) -> Float[Tensor, "batch *rest"]:
    """Estimate ``eps`` of ``sample = alpha * x0 + sigma * eps``: the counterpart of :func:`data_prediction`."""
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    return model_output


def karras_data_prediction(
    prediction_type: PredictionType,
    model_output: Float[Tensor, "batch *rest"],
    sample: Float[Tensor, "batch *rest"],
    *,
    sigma: float,
) -> Float[Tensor, "batch *rest"]:
    """Estimate ``x0`` of ``sample = x0 + sigma * eps`` (variance exploding, Karras et al., 2022).

    The model saw ``sample / sqrt(sigma**2 + 1)``, so a ``v_prediction`` is converted through
    the variance-preserving scaling of that input.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


def dynamic_threshold(
    x0: Float[Tensor, "batch *rest"], *, ratio: float, max_value: float
) -> Float[Tensor, "batch *rest"]:
    """Clamp ``x0`` to its ``ratio`` quantile ``s`` per sample and divide by ``s`` (Saharia et al., 2022).

    Args:
        x0: clean-sample estimate.
        ratio: quantile of ``|x0|`` used as the threshold, e.g. 0.995.
        max_value: upper bound of the threshold ``s`` (its lower bound is 1).
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile is not implemented for half precision
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


__all__ = ["PredictionType", "data_prediction", "dynamic_threshold", "karras_data_prediction", "noise_prediction"]
