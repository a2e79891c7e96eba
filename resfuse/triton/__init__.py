"""resfuse's Triton kernels and the ``triton`` backend.

Importing this package is cheap: it checks that ``triton`` imports and registers the backend factory;
kernels are decorated and custom ops registered on first use (``TritonBackend()``). Kernels run
compiled on CUDA tensors, or through Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1``.

Files: ``conv_kernels.py`` / ``conv.py`` (implicit-GEMM conv with fused prologue/epilogue, its launcher),
``bn_kernels.py`` / ``bn_act.py`` (BN statistics, apply, backward), ``registry.py`` (configs and
variants, shared with ``python -m resfuse.aot``), ``ops.py`` (torch.library ops), ``backend.py``.
"""
import triton  # noqa: F401  (ImportError here = backend unavailable; resfuse/__init__ records why)

from ..backends import register_backend


def _factory():
    from .backend import TritonBackend
    return TritonBackend()


register_backend("triton", _factory)
