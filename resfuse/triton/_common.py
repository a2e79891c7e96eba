"""Small helpers shared by the Triton launchers: layouts, device facts, dummy pointers."""
from __future__ import annotations

import functools

import torch

from . import registry
from ._jit import interpreting

DTYPE_KEY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: tests set this: every output buffer a launcher allocates starts as NaN, so an element a kernel
#: forgets to write shows up as a NaN mismatch (see ``resfuse.testing.poisoned``)
POISON = False
#: number of "SMs" assumed by the interpreter: small grids keep CPU tests fast but still split work
INTERPRETER_SMS = 4


def is_cl(x: torch.Tensor) -> bool:
    """True if ``x`` should be treated as channels_last (dense NHWC and not also dense NCHW)."""
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def dense(x: torch.Tensor, cl: bool) -> torch.Tensor:
    """``x`` as a dense tensor in the given layout (no copy when it already is)."""
    return x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def layout_of(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(dense x, channels_last?)``: the input's own layout, made dense (copy only if it was strided)."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    cl = x.dim() == 4 and x.stride(1) == 1
    return dense(x, cl), cl


def vec(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A per-channel vector as contiguous float32 on ``like``'s device."""
    if t is None:
        return None
    return t.to(device=like.device, dtype=torch.float32).contiguous()


@functools.cache
def _dummy(device: str) -> torch.Tensor:
    return torch.zeros(16, dtype=torch.float32, device=device)


def dummy_f32(like: torch.Tensor) -> torch.Tensor:
    """A 16-byte-aligned fp32 buffer standing in for an absent fp32 pointer argument (never read)."""
    return _dummy(str(like.device))


@functools.cache
def _device_facts(device: str) -> tuple[int, int]:
    d = torch.device(device)
    props = torch.cuda.get_device_properties(d)
    return registry.arch_of((props.major, props.minor)), props.multi_processor_count


def arch_and_sms(t: torch.Tensor) -> tuple[int, int]:
    """``(registry arch, number of SMs)`` of ``t``'s device; the interpreter uses the sm_80 table."""
    if interpreting() or t.device.type != "cuda":
        return 80, INTERPRETER_SMS
    return _device_facts(str(t.device))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reduction_grid(ni: int, length: int, c: int, block_r: int, block_c: int, num_sms: int):
    """``(rows per program, chunks per image, G)`` for the per-channel reductions: about 4 programs per SM
    in total, each covering a multiple of ``block_r`` rows of one image. Deterministic per device."""
    cb = cdiv(c, block_c)
    want_g = max(1, (4 * num_sms) // cb)
    chunks = max(1, min(cdiv(length, block_r), cdiv(want_g, ni)))
    rows = cdiv(cdiv(length, chunks), block_r) * block_r
    chunks = max(1, cdiv(length, rows))
    return rows, chunks, ni * chunks


def new_output(shape, dtype, device, channels_last: bool) -> torch.Tensor:
    """Output buffer of a launcher (NaN-filled when :data:`POISON` is set)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def new_like(x: torch.Tensor) -> torch.Tensor:
    """``empty_like`` of a dense tensor, same layout (NaN-filled when :data:`POISON` is set)."""
    return torch.full_like(x, float("nan")) if POISON else torch.empty_like(x)


def new_f32(shape, device) -> torch.Tensor:
    """float32 scratch/result buffer (NaN-filled when :data:`POISON` is set)."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)
