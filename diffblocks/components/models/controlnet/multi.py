"""Several ControlNets steering one UNet, held as one component."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import final

from torch import nn

from diffblocks.components.models.controlnet.model import ControlNetModel


@final
class MultiControlNetModel(nn.Module):
    """ControlNets that act together: their residuals are summed, in order (diffusers' ``MultiControlNetModel``).

    It holds the nets only; the denoiser runs each with its own control image, scale and window.

    Args:
        nets: two or more ControlNets for the same UNet.

    Example:
        >>> from diffblocks.components.models.controlnet import ControlNetParams
        >>> params = ControlNetParams(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2)
        >>> len(MultiControlNetModel([ControlNetModel(params), ControlNetModel(params)]))
        2
    """

    def __init__(self, nets: Iterable[ControlNetModel]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        if len(self.nets) < 2:
            raise ValueError(f"MultiControlNetModel takes two or more ControlNets, got {len(self.nets)}: give one ControlNetModel as it is")
        for i, net in enumerate(self.nets):
            if not isinstance(net, ControlNetModel):
                raise TypeError(f"MultiControlNetModel takes ControlNetModels, but net {i} is a {type(net).__name__}")

    def __len__(self) -> int:
        return len(self.nets)

    def __iter__(self) -> Iterator[ControlNetModel]:
        return (net for net in self.nets if isinstance(net, ControlNetModel))


def controlnets(component: ControlNetModel | MultiControlNetModel) -> tuple[ControlNetModel, ...]:
    """The ControlNets of a ``controlnet`` component, one or several, in order."""
    return (component,) if isinstance(component, ControlNetModel) else tuple(component)


__all__ = ["MultiControlNetModel", "controlnets"]
