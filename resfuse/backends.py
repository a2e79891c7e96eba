"""Which implementation runs a fused unit: ``reference``, ``cpu``, ``cuda``, ``triton`` or ``auto``.

A *backend* is an object with the primitive interface of ``docs/architecture.md``. The base class
:class:`Backend` implements every method by composition of the four primitive ops (``bn_stats``,
``bn_act``, ``bn_act_backward_reduce``, ``bn_act_backward_apply``) and ATen convolutions, so a backend
overrides only what it fuses (the Triton backend fuses the BN-apply prologue and the statistics
epilogue into its convolution, the CPU backend runs inference convs through oneDNN post-ops).

Selection:

* ``set_backend(name)`` / ``with use_backend(name):`` choose globally (thread-local for the context
  manager). An unknown name raises ``ValueError`` listing the valid ones.
* ``auto`` (the default) picks, per call and by the tensors' device, the first available backend of
  ``_AUTO_ORDER`` that supports the tensors, and falls back to ``reference`` otherwise.
* An explicitly chosen backend that cannot run the given tensors raises ``BackendUnavailable``
  with the reason; ``auto`` never raises for that.
* ``last_used()`` returns, per fused op, which backend ran last (``resfuse.explain()`` prints it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

NAMES = ("auto", "reference", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given tensors."""


class ConvGeom(NamedTuple):
    """Convolution geometry; every field is a pair ``(h, w)`` of ints except ``groups``."""

    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @staticmethod
    def of(conv: torch.nn.Conv2d) -> "ConvGeom":
        if isinstance(conv.padding, str):
            raise ValueError(f"{type(conv).__name__}: string padding {conv.padding!r} is not supported; "
                             "use explicit integer padding")
        return ConvGeom(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


@dataclasses.dataclass(frozen=True)
class PostOp:
    """A final activation other than ReLU that an inference convolution applies itself: what
    :meth:`Backend.conv_bias_act` / :meth:`~Backend.conv_bias_act_step` get as ``relu`` from
    ``resfuse.functional`` on a backend whose ``post_ops`` is True (never on another one).

    ``attr``, ``scalars``, ``algorithm``: oneDNN's unary post-op as ``torch.ops.mkldnn._convolution_pointwise``
    names it; ``fn``: the same activation as a PyTorch function of a tensor its caller owns (it may
    overwrite it), for the paths that run it after the convolution. Equal (and hashed) by the first
    three fields, so it can key measured choices and plans.
    """

    attr: str
    scalars: Tuple[float, ...] = ()
    algorithm: str = ""
    fn: Callable[[torch.Tensor], torch.Tensor] = dataclasses.field(default=None, compare=False, repr=False)


class Backend:
    """Default (composed) implementation of the primitive interface; subclasses fuse what they can.

    All activation tensors are ``[N, C, H, W]``, NCHW-contiguous or channels_last; per-channel
    vectors are float32 ``[C]`` (float64 for float64 activations).
    """

    name = "base"
    #: the object providing the four primitive ops (``bn_stats`` ... ``bn_act_backward_apply``)
    prims = None
    #: optional in-place apply ``(grad_input, grad_out, out, x, a, b, d, relu, accumulate)``
    #: (``resfuse.ops.bn_act.bn_act_backward_apply_``): the fused backward then reuses gradient
    #: buffers it owns instead of allocating one per layer. None: the backward allocates.
    bn_act_backward_apply_ = None
    #: optional ``bn_act_max_pool(y, scale, shift, kernel_size, stride, padding) -> (out, argmax)`` and
    #: ``max_pool_act_backward(grad_out, argmax, y, kernel_size, stride, padding) -> dL/dz``
    #: (``resfuse.ops.bn_act``): a chain ending in a max-pool (a ResNet stem) then runs as one node.
    #: None: the max-pool runs after the chain, as the module it is.
    bn_act_max_pool = None
    max_pool_act_backward = None
    #: optional ``gate_act(x, gate, residual, relu) -> out`` and ``gate_act_backward(grad_out, out, x, gate,
    #: relu, residual_grad) -> (grad_x, grad_gate, grad_residual)`` (``resfuse.ops.gate_act``): the end of a
    #: squeeze-and-excitation block, ``act(x * gate[n, c] + residual)``, as one node. None: PyTorch ops.
    gate_act = None
    gate_act_backward = None
    #: whether :meth:`conv_bias_act` and :meth:`conv_bias_act_step` take a :class:`PostOp` as ``relu``
    #: (else ``resfuse.functional`` calls the activation module on their result)
    post_ops = False

    def available(self) -> Optional[str]:
        """``None`` if usable in this process, else the reason it is not."""
        return None

    def supports(self, *tensors: Optional[torch.Tensor]) -> Optional[str]:
        """``None`` if this backend can run on these tensors, else the reason it cannot."""
        return None

    # -- convolutions -------------------------------------------------------------------------
    def conv(self, x, w, geom: ConvGeom):
        return F.conv2d(x, w, None, geom.stride, geom.padding, geom.dilation, geom.groups)

    def conv_backward(self, grad_y, x, w, geom: ConvGeom, need_input=True, need_weight=True):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad_y, x, w, None, list(geom.stride), list(geom.padding), list(geom.dilation), False,
            [0, 0], geom.groups, [need_input, need_weight, False])
        return gx, gw

    def conv_input_grad_add_(self, acc, grad_y, x, w, geom: ConvGeom):
        """``acc += dL/dx`` of ``conv(x, w)`` for ``grad_y`` (``acc`` is a gradient the caller owns)."""
        acc.add_(self.conv_backward(grad_y, x, w, geom, True, False)[0])

    def prologue_input(self, prologue):
        """Materialise ``act(y_prev * scale + shift)`` of a prologue ``(y_prev, scale, shift, relu)``."""
        y_prev, scale, shift, relu = prologue
        return self.bn_act(y_prev, scale, shift, None, None, relu)

    def conv_stats(self, x, w, geom: ConvGeom, prologue=None, stats=True):
        """``y = conv(x, w)`` and, if ``stats``, its per-channel ``(mean, biased var)`` (else ``None``s).

        With a ``prologue = (y_prev, scale, shift, relu)`` the conv input is ``act(y_prev*scale+shift)``
        instead of ``x`` (pass ``x=None``); a fusing backend applies it while loading and never writes it.
        """
        if prologue is not None:
            x = self.prologue_input(prologue)
        y = self.conv(x, w, geom)
        if not stats:
            return y, None, None
        mean, var = self.bn_stats(y)
        return y, mean, var

    def conv_bias_act(self, x, w, bias, geom: ConvGeom, residual=None, relu=True, consume=False):
        """Inference form: ``act(conv(x, w) + bias[c] + residual)`` (BN folded into w and bias).
        ``consume``: the caller gives ``residual`` up (a backend may write the result into it)."""
        y = self.conv(x, w, geom)
        one = torch.ones_like(bias)
        return self.bn_act(y, one, bias, residual, None, relu)

    def plan_token(self):
        """What the steps of :meth:`conv_bias_act_step` depend on beyond their operands (a plan made
        under another token is not replayed)."""
        return None

    def conv_bias_act_step(self, x, w, bias, geom: ConvGeom, residual=None, relu=True):
        """A callable ``step(x, residual, consume)`` that repeats :meth:`conv_bias_act` for operands
        like these without re-deciding anything, or None (here: always; see ``CpuBackend``)."""
        return None

    # -- the four primitives (see docs/architecture.md) ------------------------------------------
    def bn_stats(self, x):
        return self.prims.bn_stats(x)

    def bn_act(self, x, scale, shift, residual=None, res_scale=None, relu=True):
        return self.prims.bn_act(x, scale, shift, residual, res_scale, relu)

    def bn_act_backward_reduce(self, grad_out, out, x, mean, residual=None, res_mean=None, relu=True):
        return self.prims.bn_act_backward_reduce(grad_out, out, x, mean, residual, res_mean, relu)

    def bn_act_backward_apply(self, grad_out, out, x, a, b, d, residual=None, res_a=None, res_b=None,
                              res_d=None, relu=True, residual_grad=False):
        return self.prims.bn_act_backward_apply(grad_out, out, x, a, b, d, residual, res_a, res_b, res_d,
                                                relu, residual_grad)


class ReferenceBackend(Backend):
    """Plain PyTorch primitives (``resfuse.reference.primitives``): portable, the oracle, the fallback."""

    name = "reference"

    def __init__(self):
        from .reference import primitives
        self.prims = primitives


class _Registry:
    def __init__(self):
        self.factories: dict[str, Callable[[], Backend]] = {"reference": ReferenceBackend}
        self.instances: dict[str, Backend] = {}
        self.unavailable: dict[str, str] = {}
        self.default = "auto"
        self.local = threading.local()
        self.last: dict[str, str] = {}


_REG = _Registry()


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make ``name`` selectable; ``factory()`` is called once, lazily, on first use."""
    if name not in NAMES:
        raise ValueError(f"unknown backend name {name!r}; valid: {', '.join(NAMES)}")
    _REG.factories[name] = factory
    _REG.instances.pop(name, None)
    _REG.unavailable.pop(name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why a backend cannot be used in this process (shown by ``resfuse.explain()``)."""
    _REG.unavailable.setdefault(name, reason)


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(NAMES)}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every later call in this process (``"auto"`` restores the default)."""
    _REG.default = _check_name(name)


def get_backend_name() -> str:
    """The backend name currently in force (the context manager's, else the global one)."""
    return getattr(_REG.local, "name", None) or _REG.default


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed calls (this thread) on backend ``name``."""
    _check_name(name)
    prev = getattr(_REG.local, "name", None)
    _REG.local.name = name
    try:
        yield
    finally:
        _REG.local.name = prev


def instance(name: str) -> Tuple[Optional[Backend], Optional[str]]:
    """``(backend, None)`` if ``name`` can be constructed in this process, else ``(None, reason)``."""
    if name in _REG.instances:
        return _REG.instances[name], None
    if name in _REG.unavailable:
        return None, _REG.unavailable[name]
    factory = _REG.factories.get(name)
    if factory is None:
        return None, _REG.unavailable.get(name, "not registered (its module failed to import)")
    try:
        b = factory()
        reason = b.available()
    except Exception as e:  # a backend that fails to construct is unavailable, with the reason
        b, reason = None, f"{type(e).__name__}: {e}"
    if reason is not None:
        _REG.unavailable[name] = reason
        return None, reason
    _REG.instances[name] = b
    return b, None


def availability() -> dict:
    """``{name: None | reason}`` for every backend except ``auto``."""
    return {n: instance(n)[1] for n in NAMES if n != "auto"}


def select(op: str, *tensors: Optional[torch.Tensor]) -> Backend:
    """The backend that runs ``op`` on ``tensors`` under the current choice; records it for explain()."""
    name = get_backend_name()
    ts = [t for t in tensors if t is not None]
    if name == "auto":
        chosen = None
        dev = ts[0].device.type if ts else "cpu"
        for cand in _AUTO_ORDER.get(dev, ()):
            b, reason = instance(cand)
            if b is not None and b.supports(*ts) is None:
                chosen = b
                break
        if chosen is None:
            chosen = instance("reference")[0]
    else:
        chosen, reason = instance(name)
        if chosen is None:
            raise BackendUnavailable(f"resfuse backend {name!r} is not available: {reason}")
        reason = chosen.supports(*ts)
        if reason is not None:
            raise BackendUnavailable(f"resfuse backend {name!r} cannot run {op}: {reason}")
    _REG.last[op] = chosen.name
    return chosen


def note_used(op: str, name: str) -> None:
    """Record that backend ``name`` ran ``op`` (what :func:`select` records, for calls that skip it)."""
    _REG.last[op] = name


def last_used() -> dict:
    """``{op: backend name}`` of the backend that ran each fused op last."""
    return dict(_REG.last)
