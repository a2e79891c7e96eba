"""The primitive ops of ``docs/architecture.md`` as ``torch.ops.resfuse.*``: typed wrappers and the
fake (meta) kernels that let ``torch.compile`` trace through them — the four BN primitives, the
in-place apply, the CPU stem's ``bn_act_max_pool`` / ``max_pool_act_backward``, and the CPU
per-channel ops ``bn_normalize`` / ``bn_backward_coefficients`` / ``bn_running_update_`` that the
fused chain calls instead of a few tensor ops per BN layer where :func:`params_in_cpp` says so.

Conventions shared by every op:

* Activations (``input``, ``residual``, ``grad_out``, ``output``) are 4-D ``[N, C, H, W]`` tensors
  of one dtype, float32, float64, bfloat16 or float16, on one device. The kernels run NCHW-contiguous
  and channels_last tensors natively, in the memory format of ``input``; any other strides (a slice,
  or an operand stored in the other format) are copied once to that format inside the op. Outputs are
  dense in ``input``'s memory format.
* Per-channel vectors (``scale``, ``shift``, ``mean``, ``a`` ...) and per-channel results are ``[C]``
  float32, float64 when the activations are float64; statistics are accumulated in that dtype or
  wider.
* ``dz`` is ``grad_out`` where the forward ReLU passed (``output > 0``) and 0 elsewhere when
  ``relu``, else ``grad_out`` (``output`` is then not read).

The C++ kernels live in ``csrc/cpu/<op>.cpp`` and ``csrc/cuda/``; the plain-PyTorch equivalents
(oracle and fallback) in :mod:`resfuse.reference.primitives`.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _extension

__all__ = ["bn_act", "bn_act_backward_apply", "bn_act_backward_apply_", "bn_act_backward_reduce", "bn_act_max_pool",
           "bn_backward_coefficients", "bn_normalize", "bn_running_update_", "bn_stats", "max_pool_act_backward",
           "params_in_cpp"]


_BOUND: dict = {}  # name -> torch.ops.resfuse.<name>.default, looked up once (~1 us a call otherwise)


def _op(name: str):
    fn = _BOUND.get(name)
    if fn is None:
        if not _extension.LOADED:
            raise RuntimeError(f"torch.ops.resfuse.{name} is unavailable: {_extension.ERROR}")
        fn = getattr(torch.ops.resfuse, name).default
        # not while torch.compile traces: the fused chain's autograd.Function is traced as one
        # higher-order op, inside which a write to a module-level dict is an unsupported side effect
        if not torch.compiler.is_compiling():
            _BOUND[name] = fn
    return fn


def bn_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, var)`` of ``input`` ``[N, C, H, W]`` over N, H and W.

    ``var`` is the biased variance (divided by ``N*H*W``). Both are ``[C]`` float32 (float64 for
    float64 input); NaN when ``N*H*W == 0``. Computed from chunked two-pass moments merged with
    Chan's formula, so a large mean does not cost the variance its precision.
    """
    return _op("bn_stats")(input)


def bn_act(input: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None,
           res_scale: Tensor | None = None, relu: bool = True) -> Tensor:
    """``act(input * scale[c] + shift[c] + R)`` in one pass.

    ``R`` is ``residual * res_scale[c]`` when ``res_scale`` is given, ``residual`` when only
    ``residual`` is, else 0; ``residual`` has the shape and dtype of ``input``. ``act`` is ReLU when
    ``relu``, else the identity; NaN propagates through both. ``scale``, ``shift``, ``res_scale``
    are ``[C]`` vectors. Returns a tensor like ``input`` in its memory format.
    """
    return _op("bn_act")(input, scale, shift, residual, res_scale, relu)


def bn_act_backward_reduce(grad_out: Tensor, output: Tensor, input: Tensor, mean: Tensor,
                           residual: Tensor | None = None, res_mean: Tensor | None = None,
                           relu: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel sums for the backward of :func:`bn_act`.

    Returns ``(sum_dz, sum_dz_xmu, sum_dz_rmu)``: the sums over N, H, W of ``dz``,
    ``dz * (input - mean[c])`` and ``dz * (residual - res_mean[c])``, each ``[C]`` (the last is an
    empty ``[0]`` tensor when ``residual`` is None). ``residual`` and ``res_mean`` go together;
    ``output`` is the forward output (read only when ``relu``).
    """
    return _op("bn_act_backward_reduce")(grad_out, output, input, mean, residual, res_mean, relu)


def bn_act_backward_apply(grad_out: Tensor, output: Tensor, input: Tensor, a: Tensor, b: Tensor, d: Tensor,
                          residual: Tensor | None = None, res_a: Tensor | None = None,
                          res_b: Tensor | None = None, res_d: Tensor | None = None,
                          relu: bool = True, residual_grad: bool = False) -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_residual)`` for the backward of :func:`bn_act`, in one pass.

    ``grad_input = a[c] * dz + b[c] * input + d[c]``. ``grad_residual`` is
    ``res_a[c] * dz + res_b[c] * residual + res_d[c]`` when ``residual_grad`` and ``res_a`` is given
    (``res_a``, ``res_b``, ``res_d`` go together and need ``residual``), ``dz`` when
    ``residual_grad`` without ``res_a``, and an empty ``[0]`` tensor when not ``residual_grad``.
    Both are like ``input``, in its memory format. The ``[C]`` coefficients encode train-mode,
    eval-mode and synchronised BN alike (``docs/architecture.md``).
    """
    return _op("bn_act_backward_apply")(grad_out, output, input, a, b, d, residual, res_a, res_b, res_d,
                                        relu, residual_grad)


def bn_act_backward_apply_(grad_input: Tensor, grad_out: Tensor, output: Tensor, input: Tensor | None,
                           a: Tensor, b: Tensor, d: Tensor, relu: bool = True, accumulate: bool = False) -> None:
    """In place: ``grad_input = a[c] * dz + b[c] * input + d[c]``, plus ``grad_input``'s old value
    when ``accumulate``; without ``input`` the ``b`` term is absent (not ``0 * input``).

    ``grad_input`` is dense NCHW or channels_last and may be ``grad_out`` itself (a gradient buffer
    the caller owns; ``accumulate`` must then be False) or ``input`` itself (a conv output the caller
    owns and needs no more) but must not otherwise share memory with an operand. The fused backward
    uses it to turn a conv's input gradient into the previous layer's ``dL/dy`` without a new buffer,
    to write a conv output's gradient over that output, and to add the identity shortcut's ``dz`` into
    the block input's gradient. Returns None.
    """
    _op("bn_act_backward_apply_")(grad_input, grad_out, output, input, a, b, d, relu, accumulate)


def bn_act_max_pool(input: Tensor, scale: Tensor, shift: Tensor, kernel_size, stride, padding) -> tuple[Tensor, Tensor]:
    """A ResNet stem's BN-apply + ReLU + max-pool in one pass (CPU kernel).

    ``output = max_pool2d(relu(input * scale[c] + shift[c]), kernel_size, stride, padding)``
    (dilation 1, floor mode, ATen's choice among equal maxima, NaN propagating), ``[N, C, Ho, Wo]``;
    ``argmax``: uint8 ``[N, C, Ho, Wo]``, per output element the window-local index ``r * kW + s``
    (from the window's unpadded top-left corner) of the element the max came from, 255 where that
    ReLU output is <= 0 — what :func:`max_pool_act_backward` needs, at 1/8 of ATen's int64 indices, and
    the full-size activation is never written. Both in ``input``'s memory format; ``kernel_size``,
    ``stride``, ``padding`` are pairs (``kH * kW <= 255``).
    """
    return _op("bn_act_max_pool")(input, scale, shift, list(kernel_size), list(stride), list(padding))


def max_pool_act_backward(grad_output: Tensor, argmax: Tensor, input: Tensor, kernel_size, stride, padding) -> Tensor:
    """``dL/dz`` of :func:`bn_act_max_pool` for ``z = input * scale + shift``: ``grad_output``
    ``[N, C, Ho, Wo]`` routed to the argmax elements (summed where windows overlap, in float32 —
    float64 for float64), 0 elsewhere. ``input`` only gives the result's shape, dtype and memory
    format."""
    return _op("max_pool_act_backward")(grad_output, argmax, input, list(kernel_size), list(stride), list(padding))


# ---- per-channel arithmetic of a BN layer (CPU, csrc/cpu/bn_params.cpp) ----------------------------
def params_in_cpp(t: Tensor) -> bool:
    """Whether a BN layer's per-channel arithmetic on ``t``'s device runs as the one-call C++ ops
    below: CPU tensors with the extension loaded, in eager mode. Elsewhere the callers use their
    tensor-op form: on a GPU each op is an asynchronous launch anyway, and under ``torch.compile``
    Inductor fuses that form into one kernel."""
    return _extension.LOADED and t.is_cpu and not torch.compiler.is_compiling()


def bn_normalize(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                 count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(invstd, scale, shift, unbiased)`` of a BN layer from its (batch or running) ``mean`` and
    biased ``var``: ``invstd = 1 / sqrt(var + eps)``, ``scale = weight * invstd`` (``invstd`` without
    ``weight``), ``shift = bias - mean * scale`` (``-(mean * invstd)``), ``unbiased = var * count /
    max(count - 1, 1)`` for the running-variance update. All ``[C]`` float32 or float64 CPU tensors of
    one dtype; ``weight`` and ``bias`` go together."""
    return _op("bn_normalize")(mean, var, weight, bias, eps, count)


def bn_backward_coefficients(sum_dz: Tensor, sum_dz_xmu: Tensor, mean: Tensor, invstd: Tensor,
                             weight: Tensor | None, count: int, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, b, d, xmu)`` with ``dL/dy = a * dz + b * y + d`` for the sums of
    :func:`bn_act_backward_reduce` over ``count`` values per channel: ``xmu = sum_dz_xmu * invstd``
    (the weight's gradient), ``a = weight * invstd`` (``invstd`` without ``weight``); with
    ``batch_stats`` ``b = -(a * invstd * xmu) / count`` and ``d = -(a * sum_dz + count * b * mean) /
    count``, else ``b = d = 0`` (normalised by running statistics). ``[C]`` CPU vectors of one dtype,
    float32 or float64."""
    return _op("bn_backward_coefficients")(sum_dz, sum_dz_xmu, mean, invstd, weight, count, batch_stats)


def bn_running_update_(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, mean: Tensor,
                       unbiased: Tensor, momentum: float) -> None:
    """In place, ``nn.BatchNorm2d``'s update for a float ``momentum``: ``running_mean = (1 - momentum)
    * running_mean + momentum * mean``, ``running_var`` likewise with ``unbiased``,
    ``num_batches_tracked += 1``. ``[C]`` contiguous CPU vectors of one dtype (float32 or float64) and
    a one-element int64 counter."""
    _op("bn_running_update_")(running_mean, running_var, num_batches_tracked, mean, unbiased, momentum)


# ---- fake kernels: output metadata only (shapes, dtypes, memory format), for torch.compile ----------

def _like_input(input: Tensor) -> Tensor:
    """An empty activation like ``input``, dense in the memory format the kernels write."""
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=suggest_memory_format(input))


def _per_channel(input: Tensor, channels) -> Tensor:
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    return input.new_empty((channels,), dtype=dtype)


if _extension.LOADED:
    @torch.library.register_fake("resfuse::bn_stats")
    def _bn_stats_fake(input):
        return _per_channel(input, input.shape[1]), _per_channel(input, input.shape[1])

    @torch.library.register_fake("resfuse::bn_act")
    def _bn_act_fake(input, scale, shift, residual, res_scale, relu):
        return _like_input(input)

    @torch.library.register_fake("resfuse::bn_act_backward_reduce")
    def _bn_act_backward_reduce_fake(grad_out, output, input, mean, residual, res_mean, relu):
        C = input.shape[1]
        return (_per_channel(input, C), _per_channel(input, C),
                _per_channel(input, C if residual is not None else 0))

    @torch.library.register_fake("resfuse::bn_act_backward_apply")
    def _bn_act_backward_apply_fake(grad_out, output, input, a, b, d, residual, res_a, res_b, res_d, relu,
                                    residual_grad):
        grad_residual = _like_input(input) if residual_grad else input.new_empty((0,))
        return _like_input(input), grad_residual

    @torch.library.register_fake("resfuse::bn_act_backward_apply_")
    def _bn_act_backward_apply_inplace_fake(grad_input, grad_out, output, input, a, b, d, relu, accumulate):
        return None

    def _pooled_shape(input, kernel_size, stride, padding):
        n, c, h, w = input.shape
        return (n, c, (h + 2 * padding[0] - kernel_size[0]) // stride[0] + 1,
                (w + 2 * padding[1] - kernel_size[1]) // stride[1] + 1)

    @torch.library.register_fake("resfuse::bn_act_max_pool")
    def _bn_act_max_pool_fake(input, scale, shift, kernel_size, stride, padding):
        shape = _pooled_shape(input, kernel_size, stride, padding)
        fmt = suggest_memory_format(input)
        return (input.new_empty(shape).contiguous(memory_format=fmt),
                input.new_empty(shape, dtype=torch.uint8).contiguous(memory_format=fmt))

    @torch.library.register_fake("resfuse::max_pool_act_backward")
    def _max_pool_act_backward_fake(grad_output, argmax, input, kernel_size, stride, padding):
        return _like_input(input)

    @torch.library.register_fake("resfuse::bn_normalize")
    def _bn_normalize_fake(mean, var, weight, bias, eps, count):
        return tuple(torch.empty_like(mean, memory_format=torch.contiguous_format) for _ in range(4))

    @torch.library.register_fake("resfuse::bn_backward_coefficients")
    def _bn_backward_coefficients_fake(sum_dz, sum_dz_xmu, mean, invstd, weight, count, batch_stats):
        return tuple(torch.empty_like(mean, memory_format=torch.contiguous_format) for _ in range(4))

    @torch.library.register_fake("resfuse::bn_running_update_")
    def _bn_running_update_fake(running_mean, running_var, num_batches_tracked, mean, unbiased, momentum):
        return None
