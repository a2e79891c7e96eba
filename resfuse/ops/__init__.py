"""Python side of resfuse's operators.

:mod:`resfuse.ops.bn_act` wraps the compiled ops ``torch.ops.resfuse.*`` (typed functions and
fake kernels); :mod:`resfuse.ops.chain` is the autograd node of a fused conv-BN chain.
The module is not shadowed by its function of the same name: ``resfuse.ops.bn_act.bn_act``.
"""
from . import bn_act  # noqa: F401  (registers the fake kernels when the extension is loaded)
