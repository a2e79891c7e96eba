"""Python side of resfuse's operators.

:mod:`resfuse.ops.bn_act` wraps the compiled ops ``torch.ops.resfuse.*`` (typed functions and
fake kernels); :mod:`resfuse.ops.chain` is the autograd node of a fused conv-BN chain;
:mod:`resfuse.ops.gate_act` the end of a squeeze-and-excitation block (op, fake kernels, autograd).
The module is not shadowed by its function of the same name: ``resfuse.ops.bn_act.bn_act``.
"""
from . import bn_act, gate_act  # noqa: F401  (register the fake kernels when the extension is loaded)
