"""Choose channels_last once, at a model's input, and keep it through every block.

On CPU, oneDNN convolutions run natively in NHWC: with a channels_last input every fused unit reads
and writes channels_last (resfuse's kernels and the oneDNN fast path compute in channels_last wherever the input or the weight is),
so no layer ever converts its activations. With an NCHW input each oneDNN convolution reorders its
input and output between NCHW and its blocked layout — a hidden conversion per layer. Converting once
at the input is the cheap fix; this module does it without touching the model's code::

    model = resfuse.layout.channels_last(resfuse.fuse(torchvision.models.resnet50()))
    model(x)            # x may be NCHW: converted once by a forward pre-hook

:func:`channels_last` is opt-in and reversible (``channels_last(model, False)``). It also stores the
model's 4-D parameters (conv weights) in channels_last, as ``model.to(memory_format=...)`` does, so
that training-mode convolutions (ATen/oneDNN) and their weight gradients stay NHWC too. The returned
model's outputs are unchanged in value; a 4-D output would be channels_last (a ResNet's logits are 2-D).

The fused ``resfuse.models.ResNet`` / ``CifarResNet`` (what ``resfuse.fuse`` makes of a torchvision or
reference ResNet) do the input half of this by themselves in CPU inference (:func:`inference_input`):
a plain ``resfuse.fuse(model)(x)`` with an NCHW ``x`` runs channels_last inside (resnet50, batch 1,
1 thread: 112 -> 74 ms; eager 114). Forward hooks inside such a model then see channels_last tensors
(same values). :func:`set_auto` ``(False)`` turns that off.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn

__all__ = ["channels_last", "to_channels_last", "is_channels_last", "inference_input", "set_auto"]

_HOOK_ATTR = "_resfuse_channels_last_hook"
_auto = True


def set_auto(enabled: bool) -> None:
    """Process-wide: whether the fused ResNets convert an NCHW input to channels_last in CPU
    inference (:func:`inference_input`; default ``True``)."""
    global _auto
    _auto = bool(enabled)


def inference_input(x: Any) -> Any:
    """``x`` as channels_last where resfuse's CPU inference would otherwise run NCHW — every oneDNN
    convolution then reorders its input and output per layer, and Winograd does not apply: a
    4-D floating-point CPU tensor that is not channels_last, grad mode off, the ``cpu`` backend's oneDNN
    fast path in force (backend ``auto`` or ``cpu``). Anything else is returned as it is (training
    keeps the layout the caller chose for activations and weights alike)."""
    if (not _auto or torch.is_grad_enabled() or type(x) is not torch.Tensor or x.device.type != "cpu"
            or x.dim() != 4 or not x.is_floating_point() or is_channels_last(x)
            or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return x
    from . import backends, cpu_backend
    if backends.get_backend_name() not in ("auto", "cpu") or cpu_backend.onednn_status() is not None:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is stored channels_last (and is not also plain NCHW-contiguous, which
    happens for ``C == 1`` or ``H == W == 1``: such a tensor counts as channels_last too)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def to_channels_last(x: Any) -> Any:
    """``x`` as channels_last if it is a 4-D floating-point tensor (a no-op when it already is)."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _input_hook(module: nn.Module, args: Tuple[Any, ...]):
    if args and isinstance(args[0], torch.Tensor):
        return (to_channels_last(args[0]),) + tuple(args[1:])
    return None


def channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make ``model`` convert its (first, 4-D) input to channels_last once per call and store its
    4-D parameters channels_last; ``enabled=False`` removes the input hook again (parameters keep
    their layout — call ``model.to(memory_format=torch.contiguous_format)`` to undo that too).

    Returns ``model`` (modified in place). Idempotent.
    """
    handle = getattr(model, _HOOK_ATTR, None)
    if not enabled:
        if handle is not None:
            handle.remove()
            delattr(model, _HOOK_ATTR)
        return model
    model.to(memory_format=torch.channels_last)
    if handle is None:
        setattr(model, _HOOK_ATTR, model.register_forward_pre_hook(_input_hook))
    return model
