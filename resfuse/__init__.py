"""resfuse: fused conv + BatchNorm + ReLU + shortcut-add for ResNet-style networks.

Quick start::

    import resfuse
    model = resfuse.fuse(torchvision.models.resnet50())   # same parameters, same function, fewer passes
    print(resfuse.explain(model))

Backends (``resfuse.set_backend`` / ``resfuse.use_backend``): ``auto`` (default), ``reference`` (plain
PyTorch), ``cpu`` (C++ kernels + oneDNN), ``cuda`` (hand-written CUDA kernels), ``triton``.
"""
from __future__ import annotations

import platform

import torch

from . import _extension
from .backends import (BackendUnavailable, availability, get_backend_name, last_used, set_backend,
                       use_backend, mark_unavailable)
from . import cpu_backend  # noqa: F401  (registers "cpu")

try:
    from . import cuda_backend  # noqa: F401  (registers "cuda" when the CUDA kernels are built)
except ImportError as _e:  # pragma: no cover - depends on the build
    mark_unavailable("cuda", f"resfuse.cuda_backend failed to import: {_e}")

try:
    from . import triton as _triton_pkg  # noqa: F401  (registers "triton" when triton is importable)
except ImportError as _e:
    mark_unavailable("triton", f"triton is not importable: {_e}")

from . import functional  # noqa: E402
from . import nn  # noqa: E402
from . import models  # noqa: E402
from . import reference  # noqa: E402
from .convert import fuse, unfuse  # noqa: E402

__version__ = "0.1.0"

__all__ = ["fuse", "unfuse", "explain", "set_backend", "use_backend", "get_backend_name", "availability",
           "last_used", "BackendUnavailable", "functional", "nn", "models", "reference"]


def explain(model: "torch.nn.Module | None" = None) -> str:
    """A short human-readable report.

    Without ``model``: versions, devices, which backends are available (and why not), the backend
    in force, and which backend ran last for each fused op. With ``model``: what ``fuse`` swapped in
    it, what it left and why.
    """
    if model is not None:
        from .convert import explain_model
        return explain_model(model)
    lines = [f"resfuse {__version__} | torch {torch.__version__} | python {platform.python_version()}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append(f"devices: cpu ({torch.get_num_threads()} threads); no CUDA device")
    lines.append(f"C++ extension: {'loaded' if _extension.LOADED else 'NOT loaded: ' + str(_extension.ERROR)}"
                 + (" (with CUDA kernels)" if _extension.LOADED and _extension.has_cuda_kernels() else ""))
    lines.append(f"backend in force: {get_backend_name()}")
    lines.append("backends:")
    for name, reason in availability().items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    used = last_used()
    if used:
        lines.append("last run: " + ", ".join(f"{op} -> {b}" for op, b in sorted(used.items())))
    from . import cpu_conv
    picked = cpu_conv.choices()
    counts = {a: sum(v == a for v in picked.values()) for a in cpu_conv.ALGOS[1:]}
    lines.append(f"cpu convolutions: {cpu_conv.get_algo()} (RESFUSE_CPU_CONV); measured choices for "
                 f"{len(picked)} shapes: " + ", ".join(f"{a} {n}" for a, n in counts.items()))
    return "\n".join(lines)
