"""Denoisers: one wrapper per model family, called as ``denoiser(x, t, conditioning)``, and the typed conditioning."""

from diffblocks.components.denoisers.base import AbstractDenoiser, Predict, PredictionType
from diffblocks.components.denoisers.conditioning import Conditioning, check_joinable
from diffblocks.components.denoisers.controlnet import AnyControl, Control, ControlNetDenoiser, UnionControl, control_residuals
from diffblocks.components.denoisers.flux import FluxDenoiser
from diffblocks.components.denoisers.flux_controlnet import FluxControl, flux_control_residuals
from diffblocks.components.denoisers.unet import UNetDenoiser

__all__ = ["AbstractDenoiser", "AnyControl", "Conditioning", "Control", "ControlNetDenoiser", "FluxControl", "FluxDenoiser", "Predict", "PredictionType", "UNetDenoiser", "UnionControl", "check_joinable", "control_residuals", "flux_control_residuals"]
