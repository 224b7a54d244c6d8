"""Which control type each control image of an SDXL ControlNet-Union shows (``control_mode``), checked before any work."""

from __future__ import annotations

from collections.abc import Sequence

from diffblocks.blocks.errors import FieldError
from diffblocks.components.models.controlnet import ControlNetModel, ControlNetUnionModel

_MSG_NOT_UNION = "control_mode {mode} is given, but the ControlNet is not a ControlNet-Union: leave control_mode out"
_MSG_NO_MODE = "the ControlNet-Union reads the control type of each image: pass control_mode (0..{last} of its {n} types)"
_MSG_MODE = "the ControlNet-Union knows {n} control types (0..{last}), got control_mode {got}: pick the type its model card gives"
_MSG_NOT_TYPES = "one ControlNet-Union takes a control type, or a list of them (one per control image); got control_mode {got}"
_MSG_TWICE = "control_mode {modes} names a control type twice: give one image per type"
_MSG_PER_NET = (
    "with {nets} ControlNets, control_mode is a list of one entry per net: a union's control type (or a list of "
    "them, one per control image it reads), None for a net that is not a union; got {got}"
)
_MSG_NET_NOT_UNION = "control_mode[{i}] is {mode}, but ControlNet {i} is not a ControlNet-Union: give None in its place"
_MSG_NET_NO_MODE = "ControlNet {i} is a ControlNet-Union: give control_mode[{i}], the control type of its image (0..{last})"

Mode = int | list[int]
"""One union's control modes: one type (for one control image), or one per control image."""


def union_modes(union: ControlNetUnionModel, mode: Mode | list[Mode | None] | None) -> tuple[int, ...]:
    """The control types of a union's images, checked: each in ``0..num_control_type-1``, none twice.

    Raises:
        FieldError: ``control_mode`` is missing, not a type or a list of types, out of range, or
            names a type twice.
    """
    count = union.params.num_control_type
    if mode is None:
        raise FieldError("control_mode", _MSG_NO_MODE.format(n=count, last=count - 1))
    modes: list[int] = []
    for m in [mode] if isinstance(mode, int) else mode:
        if not isinstance(m, int):
            raise FieldError("control_mode", _MSG_NOT_TYPES.format(got=mode))
        if not 0 <= m < count:
            raise FieldError("control_mode", _MSG_MODE.format(n=count, last=count - 1, got=m))
        modes.append(m)
    if len(set(modes)) != len(modes):
        raise FieldError("control_mode", _MSG_TWICE.format(modes=modes))
    return tuple(modes)


def modes_per_net(
    nets: Sequence[ControlNetModel | ControlNetUnionModel], mode: Mode | list[Mode | None] | None
) -> list[tuple[int, ...] | None]:
    """Each net's control modes: a union's, checked (:func:`union_modes`), and None for a plain ControlNet.

    One union takes its mode (or modes) as it is. Beside other nets, ``control_mode`` is a list with
    one entry per net, as diffusers' ``StableDiffusionXLControlNetUnionPipeline`` takes it for a
    ``MultiControlNetUnionModel``; plain nets take none.

    Raises:
        FieldError: a mode is given to nets that are no unions, a union's mode is missing or wrong,
            or the list's length is not the number of nets.
    """
    if not any(isinstance(net, ControlNetUnionModel) for net in nets):
        if mode is not None:
            raise FieldError("control_mode", _MSG_NOT_UNION.format(mode=mode))
        return [None] * len(nets)
    if len(nets) == 1:
        assert isinstance(nets[0], ControlNetUnionModel)
        return [union_modes(nets[0], mode)]
    if not isinstance(mode, list) or len(mode) != len(nets):
        raise FieldError("control_mode", _MSG_PER_NET.format(nets=len(nets), got=mode))
    modes: list[tuple[int, ...] | None] = []
    for i, (net, each) in enumerate(zip(nets, mode, strict=True)):
        if isinstance(net, ControlNetUnionModel):
            if each is None:
                raise FieldError("control_mode", _MSG_NET_NO_MODE.format(i=i, last=net.params.num_control_type - 1))
            modes.append(union_modes(net, each))
        elif each is not None:
            raise FieldError("control_mode", _MSG_NET_NOT_UNION.format(i=i, mode=each))
        else:
            modes.append(None)
    return modes


__all__ = ["Mode", "modes_per_net", "union_modes"]
