"""Synchronised BatchNorm for the fused chain, on ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

A fused chain whose BN layers are ``nn.SyncBatchNorm`` (and ``torch.distributed`` is initialised)
calls two functions per BN layer (see ``resfuse/ops/chain.py``):

* forward, between the statistics pass and the apply::

      mean, var, count = sync_batch_stats(mean, var, count, group)

  Each rank has the per-channel mean and *biased* variance of its own ``count = N·H·W`` elements.
  They are packed with the count into one float64 ``[1 + 2C]`` tensor ``[count, mean, M2 = var·count]``
  and gathered with ONE ``all_gather_single`` (``all_gather_into_tensor``) into ``[W, 1 + 2C]``; every
  rank then merges the W partials itself with Chan's parallel formula::

      N  = Σ n_r
      μ  = Σ (n_r / N) · μ_r
      M2 = Σ M2_r + Σ n_r · (μ_r − μ)²          var = M2 / N   (biased)

  This is the k-way form of Chan, Golub & LeVeque's pairwise merge: exact algebra, and numerically
  safe because the spread term is taken around the merged mean (never Σx² − Nμ²). It is computed in
  float64, vectorised over ranks (a handful of kernels whatever the world size), in rank order:
  deterministic and bit-identical on every rank, so running statistics never drift apart between
  ranks. Counts travel as float64 (exact up to 2^53 elements). Ranks with an empty batch take part
  with ``n = 0`` and contribute nothing. Why a gather and not an ``all_reduce``: the exact merge needs
  each rank's ``(n, μ, M2)``; an ``all_reduce`` of raw sums ``(n, Σx, Σx²)`` cancels catastrophically
  when ``|μ| ≫ σ``, and a shifted-sums ``all_reduce`` needs a shift known to all ranks before the
  collective (the layer's running mean is not passed here, and is poor early in training). The gather
  moves ``W·(2C+1)`` doubles — at most a few hundred KiB for ResNet widths — and is latency-bound
  like the ``all_reduce`` would be; ``nn.SyncBatchNorm`` itself gathers too.

  The global count is returned as a Python ``int`` (the chain uses it for the unbiased running
  variance and the backward coefficients), which costs one device→host copy per synchronised layer —
  ``nn.SyncBatchNorm`` has the same synchronisation (its empty-rank mask).

* backward, between the reduce and the apply::

      sum_dz, sum_dz_xmu = sync_grad_sums(sum_dz, sum_dz_xmu, group)

  ONE ``all_reduce(SUM)`` of the packed ``[2C]`` tensor. Exact: the forward normalised with the
  *global* mean, and the chain's reduce computes ``Σ dz·(y − μ_global)`` per rank, so the sum over
  ranks is the global ``Σ dz·(y − μ)``.

``group`` is the BN modules' ``process_group`` (``None`` = WORLD). A group of one rank, and a rank that
is not a member of ``group``, normalise with their local statistics and make no collective call — as
``nn.SyncBatchNorm`` does (it falls back to plain BN there), including its "Expected more than 1 value
per channel" error. Everything runs under ``torch.no_grad`` (it is called inside the autograd
Function's forward and backward) and works for float32 and float64 statistics, CPU (gloo) and CUDA
(NCCL) tensors. Failures: a rank that raises leaves its peers blocked in the next collective until the
process group's ``timeout`` (or until gloo notices the closed connection) — give
``init_process_group`` a timeout; see ``docs/distributed.md``.
"""
from __future__ import annotations

import torch

__all__ = ["DistributedDataParallel", "group_size", "merge_stats", "sync_batch_stats", "sync_grad_sums"]

#: test/benchmark hook: run the collectives even in a group of one rank (to exercise and time them
#: on a single GPU). Never needed in normal use.
_FORCE_COLLECTIVES = False


def group_size(group=None) -> int:
    """Ranks that synchronise with this one in ``group`` (``None`` = WORLD): 1 when
    ``torch.distributed`` is unavailable or not initialised, -1 when this rank is not in ``group``."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _collective_size(group) -> int:
    """How many ranks the collectives of this call span; 0 = no collective (local statistics)."""
    ws = group_size(group)
    if ws > 1 or (ws == 1 and _FORCE_COLLECTIVES):
        return ws
    return 0


def merge_stats(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-partition statistics: ``counts [W]``, ``means [W, C]``, ``m2s [W, C]`` (M2 = Σ(x−μ_r)²,
    i.e. biased var × count) → ``(total [], mean [C], biased var [C])``, all float64.

    Partitions with a zero count contribute nothing (their mean/M2 are ignored even if NaN). If every
    count is zero the result is mean 0, var 0.
    """
    counts = counts.to(torch.float64).reshape(-1)
    means = means.to(torch.float64).reshape(counts.numel(), -1)
    m2s = m2s.to(torch.float64).reshape(counts.numel(), -1)
    has = (counts > 0).unsqueeze(1)
    zero = means.new_zeros(())
    means = torch.where(has, means, zero)
    m2s = torch.where(has, m2s, zero)
    total = counts.sum()
    n = counts.unsqueeze(1)
    mean = (n * means).sum(0) / total.clamp_min(1)
    m2 = m2s.sum(0) + (n * (means - mean).square()).sum(0)
    var = m2 / total.clamp_min(1)
    return total, mean, var


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    import torch.distributed as dist
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _check_stats(name_a, a, name_b, b):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError(f"resfuse.distributed: {name_a} and {name_b} must be tensors")
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"resfuse.distributed: {name_a} and {name_b} must be [C] vectors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"resfuse.distributed: {name_a} is on {a.device}, {name_b} on {b.device}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"resfuse.distributed: {name_a}/{name_b} must be floating point, got {a.dtype}/{b.dtype}")


@torch.no_grad()
def sync_batch_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group=None
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Global ``(mean [C], biased var [C], count)`` of a BN layer over the ranks of ``group``.

    ``mean``/``var``: this rank's per-channel mean and biased variance (float32 or float64, any
    device) over its ``count = N·H·W`` elements (``count`` may differ between ranks, and may be 0).
    The outputs keep the inputs' dtypes and device; ``count`` is the sum over ranks (a Python int).
    One ``all_gather`` per call; none when the group has one rank or this rank is not in it.
    """
    _check_stats("mean", mean, "var", var)
    count = int(count)
    ws = _collective_size(group)
    if ws == 0:
        if count == 1:  # nn.SyncBatchNorm falls back to F.batch_norm here, which refuses this
            raise ValueError("Expected more than 1 value per channel when training, got input size 1 per channel "
                             "(synchronised BatchNorm in a process group of one rank)")
        return mean, var, count
    c = mean.numel()
    packed = torch.zeros(1 + 2 * c, dtype=torch.float64, device=mean.device)
    if count > 0:  # an empty rank still takes part (zeros) so that its peers are not left waiting
        packed[0] = float(count)
        packed[1:1 + c].copy_(mean)
        torch.mul(var.to(torch.float64), float(count), out=packed[1 + c:])
    gathered = torch.empty(ws * (1 + 2 * c), dtype=torch.float64, device=mean.device)  # flat: gloo wants it so
    _all_gather(gathered, packed, group)
    gathered = gathered.view(ws, 1 + 2 * c)
    total, gmean, gvar = merge_stats(gathered[:, 0], gathered[:, 1:1 + c], gathered[:, 1 + c:])
    return gmean.to(mean.dtype), gvar.to(var.dtype), int(total.item())


@torch.no_grad()
def sync_grad_sums(sum_dz: torch.Tensor, sum_dz_xmu: torch.Tensor, group=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_ranks sum_dz, Σ_ranks sum_dz_xmu)`` over ``group``: one ``all_reduce`` of a packed ``[2C]``
    tensor (in the wider of the two dtypes). New tensors; the inputs are not modified. Returns the
    inputs unchanged when the group has one rank or this rank is not in it."""
    _check_stats("sum_dz", sum_dz, "sum_dz_xmu", sum_dz_xmu)
    ws = _collective_size(group)
    if ws == 0:
        return sum_dz, sum_dz_xmu
    import torch.distributed as dist
    c = sum_dz.numel()
    dt = torch.promote_types(sum_dz.dtype, sum_dz_xmu.dtype)
    packed = torch.cat([sum_dz.to(dt), sum_dz_xmu.to(dt)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed[:c].to(sum_dz.dtype), packed[c:].to(sum_dz_xmu.dtype)


try:
    from torch.nn.parallel import DistributedDataParallel as _TorchDDP
except ImportError:  # pragma: no cover - a torch build without torch.distributed
    _TorchDDP = None

if _TorchDDP is not None:
    class DistributedDataParallel(_TorchDDP):
        """``torch.nn.parallel.DistributedDataParallel`` that also accepts a *CPU* model holding
        ``nn.SyncBatchNorm`` layers (gloo). Identical to torch's on GPUs.

        Torch's DDP refuses CPU modules with SyncBatchNorm at construction ("SyncBatchNorm layers only
        work with GPU modules") because ``nn.SyncBatchNorm`` itself only runs on GPUs. In a resfuse-fused
        model those layers are run by the fused chains, which synchronise them on any backend — so this
        subclass skips that one construction-time check on CPU and changes nothing else. A SyncBatchNorm
        that is *not* fused (called as a module) still raises torch's "SyncBatchNorm expected input tensor
        to be on GPU" at its first training forward; ``resfuse.explain(model)`` lists unfused BN layers.
        """

        def _passing_sync_batchnorm_handle(self, module):
            if getattr(self, "device_type", None) == "cpu":
                return None
            return super()._passing_sync_batchnorm_handle(module)
