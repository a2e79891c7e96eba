"""The fused unit of resfuse: a chain of conv → BatchNorm layers with ReLU between them, a shortcut
added after the last BN, and an optional final ReLU — as one autograd node.

    y_0 = conv_0(x)                      a_0 = relu(bn_0(y_0))
    y_i = conv_i(a_{i-1})                a_i = relu(bn_i(y_i))          0 < i < k
    y_k = conv_k(a_{k-1})                out = act(bn_k(y_k) + shortcut)
    shortcut = 0 | r (a tensor of out's shape) | bn_s(conv_s(x_s))   (projection)

ConvBNAct is a chain of 1, BasicBlock of 2, Bottleneck of 3. The node saves ``x``, every conv output
``y_i``, ``out`` (with a final ReLU, for its mask) and per-channel statistics, and *recomputes* ``a_i`` in backward (one cheap
elementwise pass) instead of keeping it: eager PyTorch keeps ``y_i`` (for BN) and ``a_i`` (for the
next conv) — so the chain holds one activation less per inner layer.

Where a conv output is cheap to recompute per byte it would hold (``_cheap``: a 1x1 conv reading at
most 64 fp32 channels — a Bottleneck's expansion conv and projection in a network's first stage),
the node does not save the last conv's output ``y_k`` (resp. the projection's ``y_s``) either and
recomputes it in backward from ``a_{k-1}`` (which backward rebuilds anyway for the weight gradient)
resp. ``x_s``: the early stages' activations are what a train step holds when backward reaches its
peak (the late stages' weight gradients exist by then), and these convs are the network's cheapest
per output element.

A ResNet stem (conv → BN → ReLU → max-pool) is a chain of 1 with ``spec.pool``: the backend's
``bn_act_max_pool`` pools while it applies BN and ReLU, and the node saves the pool's uint8 window
argmax instead of ``out`` and recomputes the conv output in backward (see ``_recomputes``) — where
eager keeps the conv output, the ReLU output and int64 indices.

Each BN layer runs either with batch statistics (training, or ``track_running_stats=False``) or with
its running statistics (eval; still differentiable, e.g. for frozen-BN fine-tuning). The backward of a
layer is the fused pair of primitives ``bn_act_backward_reduce`` / ``bn_act_backward_apply`` with the
per-channel coefficients of ``docs/architecture.md``; synchronised BN all-reduces the partial
statistics (forward) and the two gradient sums (backward) through ``resfuse.distributed``.

Everything here works on whatever dtype the caller gives (autocast casting is done by
``resfuse.functional``); per-channel math is float32 (float64 for float64 activations).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..backends import ConvGeom, instance
from . import bn_act as prim


class LayerSpec(NamedTuple):
    geom: ConvGeom
    eps: float
    batch_stats: bool  # normalise with batch statistics (else with the running statistics)
    affine: bool


class ChainSpec(NamedTuple):
    layers: Tuple[LayerSpec, ...]
    shortcut: str  # "none" | "tensor" | "identity" (the chain's own input) | "projection"
    shortcut_layer: Optional[LayerSpec]
    proj_on_x: bool  # the projection reads the chain's input x (then x_s is not passed again)
    relu: bool  # final activation
    sync: bool  # synchronised BN over ``group``
    group: object = None  # torch.distributed process group (None = WORLD) when sync
    # (kernel_size, stride, padding) pairs of a max-pool after the final ReLU (a ResNet stem), run by
    # the backend's ``bn_act_max_pool``; shortcut "none" and relu only
    pool: Optional[tuple] = None


# tensors per BN layer in the flat argument list: conv weight, gamma, beta, running_mean, running_var
_PER_LAYER = 5

# a conv output is recomputed in backward instead of kept when that costs at most this many
# multiply-adds per byte it frees (``_cheap``; 0: never): 16 = a 1x1 conv over <= 64 fp32 input
# channels (32 bf16), resnet50's first-stage expansion conv and projection; a 3x3 conv over 64 fp32
# channels would be 144. resnet50, batch 8, 112x112, 2 threads: peak 193 -> 169 MiB (eager: 230) for
# 1.6 % more train-step time at 1 thread (32, which adds the second stage: 157 MiB for 2.7 %)
RECOMPUTE_MACS_PER_BYTE = 16


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _count(y: torch.Tensor) -> int:
    return y.shape[0] * y.shape[2] * y.shape[3]


def _normaliser(y, mean, var, gamma, beta, rm, rv, L: LayerSpec, spec: ChainSpec, be):
    """Per-channel ``(mean, invstd, scale, shift, count, unbiased)`` of one layer, in the statistics
    dtype (``unbiased``: the batch variance for the running-variance update, None for a layer
    normalised by its running statistics)."""
    sd = _stat_dtype(y)
    count = _count(y)
    if L.batch_stats and count == 1 and not spec.sync:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(y.shape)}")
    if L.batch_stats:
        if spec.sync:
            from .. import distributed
            mean, var, count = distributed.sync_batch_stats(mean, var, count, spec.group)
        mean, var = as_dtype(mean, sd), as_dtype(var, sd)
    else:
        mean, var = as_dtype(rm, sd), as_dtype(rv, sd)
    gamma, beta = (as_dtype(gamma, sd), as_dtype(beta, sd)) if L.affine else (None, None)
    if prim.params_in_cpp(mean):
        invstd, scale, shift, unbiased = prim.bn_normalize(mean, var, gamma, beta, L.eps, count)
        return mean, invstd, scale, shift, count, unbiased if L.batch_stats else None
    invstd = (var + L.eps).rsqrt_()
    if L.affine:
        scale = invstd * gamma
        shift = torch.addcmul(beta, mean, scale, value=-1)  # beta - mean * scale
    else:
        scale, shift = invstd, (mean * invstd).neg_()
    unbiased = var * (count / max(count - 1, 1)) if L.batch_stats else None
    return mean, invstd, scale, shift, count, unbiased


def _coefficients(sum_dz, sum_dz_xmu, mean, invstd, gamma, count, L: LayerSpec, spec: ChainSpec):
    """``(a, b, d, grad_gamma, grad_beta)`` of one layer from its reduced gradient sums (``a`` may be
    ``invstd`` itself; none of them is written to)."""
    # dgamma/dbeta stay per-rank (DDP averages parameter gradients, as with nn.SyncBatchNorm)
    synced = L.batch_stats and spec.sync
    if not synced and prim.params_in_cpp(invstd):
        a, b, d, xmu = prim.bn_backward_coefficients(sum_dz, sum_dz_xmu, mean, invstd,
                                                     as_dtype(gamma, invstd.dtype) if L.affine else None,
                                                     count, L.batch_stats)
        return (a, b, d, xmu, sum_dz) if L.affine else (a, b, d, None, None)
    grad_gamma = (sum_dz_xmu * invstd) if L.affine else None
    grad_beta = sum_dz if L.affine else None
    if synced:
        from .. import distributed
        sum_dz, sum_dz_xmu = distributed.sync_grad_sums(sum_dz, sum_dz_xmu, spec.group)
    a = as_dtype(gamma, invstd.dtype) * invstd if L.affine else invstd
    if not L.batch_stats:
        zero = torch.zeros_like(a)
        return a, zero, zero, grad_gamma, grad_beta
    xmu = grad_gamma if L.affine and not synced else sum_dz_xmu * invstd  # sum_dz_xmu * invstd
    b = (a * invstd).mul_(xmu).mul_(-1.0 / count)  # -a * invstd^2 * sum_dz_xmu / count
    d = torch.addcmul(a * sum_dz, b, mean, value=count).mul_(-1.0 / count)  # -a * sum_dz / count - b * mean
    return a, b, d, grad_gamma, grad_beta


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` — ``t`` itself when it already is (``.to`` costs ~2 us a call even then, and
    a fused block makes ~18 such calls a step)."""
    return t if t.dtype == dtype else t.to(dtype)


class ConvBNChainFunction(torch.autograd.Function):
    """``apply(spec, backend_name, x, *flat)`` → ``(out, mean_0, var_0, ..., [mean_s, var_s])``.

    ``flat`` holds, per layer, ``(conv_weight, gamma, beta, running_mean, running_var)`` (gamma/beta
    None without affine, running stats None with batch statistics), then for ``shortcut="tensor"`` the
    residual, for ``"projection"`` ``(x_s, conv_weight_s, gamma_s, beta_s, running_mean_s,
    running_var_s)`` without ``x_s`` when ``spec.proj_on_x``. A tensor is never passed twice (the
    identity shortcut and a projection of ``x`` refer to ``x``), as torch.compile requires. Returned means/vars are the (synchronised) biased batch statistics of the layers
    that use batch statistics (empty tensors for the others) — the caller updates running stats.
    """

    @staticmethod
    def forward(ctx, spec: ChainSpec, backend_name: str, x, *flat):
        be = instance(backend_name)[0]
        k = len(spec.layers)
        inp, prologue = x, None
        ys, norms, stats_out = [], [], []
        for i, L in enumerate(spec.layers):
            w, gamma, beta, rm, rv = flat[_PER_LAYER * i:_PER_LAYER * (i + 1)]
            y, mean, var = be.conv_stats(inp, w, L.geom, prologue, stats=L.batch_stats)
            mean, invstd, scale, shift, count, unbiased = _normaliser(y, mean, var, gamma, beta, rm, rv, L, spec, be)
            ys.append(y)
            norms.append((mean, invstd, scale, shift, count))
            stats_out += _stats_out(L, mean, unbiased, y)
            if i < k - 1:
                inp, prologue = None, (y, scale, shift, True)

        rest = flat[_PER_LAYER * k:]
        residual = res_scale = None
        scale, shift = norms[-1][2], norms[-1][3]
        ys_s = norm_s = None
        if spec.shortcut == "tensor":
            residual = rest[0]
        elif spec.shortcut == "identity":
            residual = x
        elif spec.shortcut == "projection":
            xs, ws, gs, bs, rms, rvs = (x, *rest) if spec.proj_on_x else rest
            Ls = spec.shortcut_layer
            ys_s, mean_s, var_s = be.conv_stats(xs, ws, Ls.geom, None, stats=Ls.batch_stats)
            norm_s = _normaliser(ys_s, mean_s, var_s, gs, bs, rms, rvs, Ls, spec, be)
            residual, res_scale = ys_s, norm_s[2]
            shift = shift + norm_s[3]
            stats_out += _stats_out(Ls, norm_s[0], norm_s[5], xs)
        if spec.pool is not None:  # out = max_pool(relu(bn(y))); saved: the uint8 argmax instead of out
            out, keep = be.bn_act_max_pool(ys[-1], scale, shift, *spec.pool)
        else:
            out = be.bn_act(ys[-1], scale, shift, residual, res_scale, spec.relu)
            # out is kept for the final ReLU's mask only: without a ReLU the caller may change it in place
            # (e.g. an nn.SiLU(inplace=True) after a ConvNormAct unit's BN)
            keep = out if spec.relu else None

        ctx.spec, ctx.backend_name = spec, backend_name
        ctx.counts = [n[4] for n in norms]
        weights = [flat[_PER_LAYER * i] for i in range(k)]
        gammas = [flat[_PER_LAYER * i + 1] for i in range(k)]
        # conv outputs rebuilt in backward instead of saved (see the module docstring)
        ctx.recompute = (_recomputes(spec) or _cheap(weights[-1], spec.layers[-1].geom, ys[-1]),
                         spec.shortcut == "projection" and _cheap(ws, spec.shortcut_layer.geom, ys_s))
        if ctx.recompute[0]:
            ys[-1] = None
        if ctx.recompute[1]:
            ys_s = None
        # the conv outputs, which nothing outside the node sees, stay on ctx where that is safe, so
        # that backward frees each once used (``_may_hold``); else they are saved like the rest
        ctx.held = (ys, ys_s) if _may_hold() else None
        if ctx.held is not None:
            ys, ys_s = [None] * k, None
        saved = [x, keep, *ys, *weights, *gammas]
        for n in norms:
            saved += n[:4]  # mean, invstd, scale, shift
        if spec.shortcut == "projection":
            saved += [xs, ws, gs, ys_s, norm_s[0], norm_s[1]]
            ctx.counts.append(norm_s[4])
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*stats_out)
        return (out, *stats_out)

    @staticmethod
    def backward(ctx, grad_out, *_unused_stat_grads):
        spec = ctx.spec
        be = instance(ctx.backend_name)[0]
        k = len(spec.layers)
        saved = list(ctx.saved_tensors)
        x, out = saved[0], saved[1]
        ys = saved[2:2 + k]
        weights = saved[2 + k:2 + 2 * k]
        gammas = saved[2 + 2 * k:2 + 3 * k]
        pos = 2 + 3 * k
        norms = []
        for i in range(k):
            norms.append((*saved[pos:pos + 4], ctx.counts[i]))
            pos += 4
        held_s, owned = None, ctx.recompute  # owned: y_k / y_s may be overwritten by their gradients
        if ctx.held is not None:
            ys, held_s = list(ctx.held[0]), ctx.held[1]
            if not _keep_graph():
                ctx.held = None  # this backward's now: each conv output is dropped once used
                owned = (True, True)
        inp_last = None  # the last conv's input a_{k-1}, when rebuilt early for the recompute
        if ctx.recompute[0]:
            inp_last = x if k == 1 else be.prologue_input((ys[k - 2], *norms[k - 2][2:4], True))
            ys[-1] = be.conv(inp_last, weights[-1], spec.layers[-1].geom)
        n_flat = len(ctx.needs_input_grad) - 3
        grads = [None] * n_flat
        # reuse gradient buffers this backward owns (no new tensor per layer) where the backend can
        apply_ = None if torch.compiler.is_compiling() else be.bn_act_backward_apply_
        relu = spec.relu
        if spec.pool is not None:  # dL/d(bn output) through the max-pool and ReLU; `out` is the argmax
            grad_out = be.max_pool_act_backward(grad_out, out, ys[-1], *spec.pool)
            out, relu = grad_out, False  # (out is not read without relu)
        grad_out = grad_out.contiguous(memory_format=_memory_format(ys[-1]))
        if out is None:  # no final ReLU: out is not read, grad_out stands in for it
            out = grad_out

        # -- last layer + shortcut: one reduce, one apply -----------------------------------------
        mean, invstd, scale, shift, count = norms[-1]
        Ls = spec.shortcut_layer
        proj = spec.shortcut == "projection"
        if proj:
            xs, ws, gamma_s, ys_s, mean_s, invstd_s = saved[pos:pos + 6]
            count_s = ctx.counts[k]
            if ctx.recompute[1]:
                ys_s = be.conv(xs, ws, Ls.geom)
            elif held_s is not None:
                ys_s = held_s
        sum_dz, sum_dz_xmu, sum_dz_rmu = be.bn_act_backward_reduce(
            grad_out, out, ys[-1], mean, ys_s if proj else None, mean_s if proj else None, relu)
        a, b, d, gg, gb = _coefficients(sum_dz, sum_dz_xmu, mean, invstd, gammas[-1], count,
                                        spec.layers[-1], spec)
        _put_affine(grads, k - 1, gg, gb, None if gammas[-1] is None else gammas[-1].dtype)
        res_idx = _PER_LAYER * k - (1 if spec.proj_on_x else 0)  # flat index of x_s (or the residual)
        grad_identity, identity_late, proj_late = None, False, None
        if proj:
            ra, rb, rd, gg_s, gb_s = _coefficients(sum_dz, sum_dz_rmu, mean_s, invstd_s, gamma_s, count_s,
                                                   Ls, spec)
            need_xs = ctx.needs_input_grad[2] if spec.proj_on_x else ctx.needs_input_grad[3 + res_idx]
            need_ws = ctx.needs_input_grad[3 + res_idx + 1]
            need_res = need_xs or need_ws
            if apply_ is not None and (owned[0] or owned[1]):
                # one in-place pass per gradient, over the conv output it belongs to where that is ours
                gy = _apply_into(apply_, ys[-1], owned[0], grad_out, out, a, b, d, relu)
                g_res = _apply_into(apply_, ys_s, owned[1], grad_out, out, ra, rb, rd, relu) \
                    if need_res else None
            else:
                gy, g_res = be.bn_act_backward_apply(grad_out, out, ys[-1], a, b, d, ys_s, ra, rb, rd,
                                                     relu, need_res)
            if gg_s is not None:
                grads[res_idx + 2] = as_dtype(gg_s, gamma_s.dtype)
                grads[res_idx + 3] = as_dtype(gb_s, gamma_s.dtype)
            if spec.proj_on_x and need_xs and apply_ is not None:
                # the projection's input gradient is added into x's at the end; until then only g_res
                # (output-sized) is kept instead of an input-sized gradient
                grads[res_idx + 1] = be.conv_backward(g_res, xs, ws, Ls.geom, False, need_ws)[1]
                proj_late = g_res
            elif need_res:
                gxs, gws = be.conv_backward(g_res, xs, ws, Ls.geom, need_xs, need_ws)
                grads[res_idx + 1] = gws
                if spec.proj_on_x:
                    grad_identity = gxs
                else:
                    grads[res_idx] = gxs
            del g_res
        else:
            if spec.shortcut == "tensor":
                need_res = ctx.needs_input_grad[3 + res_idx]
            else:
                need_res = spec.shortcut == "identity" and ctx.needs_input_grad[2]
            # identity: dz is added into x's gradient at the end, from grad_out and out (alive anyway)
            identity_late = need_res and spec.shortcut == "identity" and apply_ is not None
            if spec.pool is not None and apply_ is not None:  # grad_out is ours: becomes dL/dy in place
                apply_(grad_out, grad_out, out, ys[-1], a, b, d, False, False)
                gy, g_res = grad_out, None
            elif owned[0] and apply_ is not None and (identity_late or not need_res):
                gy, g_res = _apply_into(apply_, ys[-1], True, grad_out, out, a, b, d, relu), None
            else:
                gy, g_res = be.bn_act_backward_apply(grad_out, out, ys[-1], a, b, d, None, None, None, None,
                                                     relu, need_res and not identity_late)
            if need_res and spec.shortcut == "tensor":
                grads[res_idx] = g_res
            elif need_res and not identity_late:
                grad_identity = g_res
        ys[-1] = ys_s = held_s = None  # (frees them when recomputed or held)

        # -- conv_i backward, then the fused dReLU + dBN of layer i-1 -------------------------------
        grad_x = None
        for i in range(k - 1, -1, -1):
            L = spec.layers[i]
            need_w = ctx.needs_input_grad[3 + _PER_LAYER * i]
            if i > 0:
                pm, pinv, pscale, pshift, pcount = norms[i - 1]
                inp = inp_last if i == k - 1 and inp_last is not None else \
                    be.prologue_input((ys[i - 1], pscale, pshift, True))
                inp_last = None
                g_inp, gw = be.conv_backward(gy, inp, weights[i], L.geom, True, need_w)
                s1, s2, _ = be.bn_act_backward_reduce(g_inp, inp, ys[i - 1], pm, None, None, True)
                a, b, d, gg, gb = _coefficients(s1, s2, pm, pinv, gammas[i - 1], pcount,
                                                spec.layers[i - 1], spec)
                _put_affine(grads, i - 1, gg, gb, None if gammas[i - 1] is None else gammas[i - 1].dtype)
                if apply_ is not None:  # g_inp (ours, fresh) becomes dL/dy_{i-1}
                    apply_(g_inp, g_inp, inp, ys[i - 1], a, b, d, True, False)
                    gy_prev = g_inp
                else:
                    gy_prev, _ = be.bn_act_backward_apply(g_inp, inp, ys[i - 1], a, b, d, None, None, None,
                                                          None, True, False)
                del inp, g_inp
                ys[i - 1] = None
            else:
                g_inp, gw = be.conv_backward(gy, x, weights[0], L.geom, ctx.needs_input_grad[2], need_w)
                del gy
                if proj_late is not None:  # += the projection's input gradient
                    be.conv_input_grad_add_(g_inp, proj_late, x, ws, Ls.geom)
                    del proj_late
                elif identity_late:  # += dz of the final ReLU
                    one = torch.ones_like(mean)
                    apply_(g_inp, grad_out, out, None, one, one, torch.zeros_like(mean), spec.relu, True)
                elif grad_identity is not None:
                    g_inp = grad_identity if g_inp is None else g_inp.add_(grad_identity)
                grad_x, gy_prev = g_inp, None
            grads[_PER_LAYER * i] = gw
            gy = gy_prev
        return (None, None, grad_x, *grads)


def _recomputes(spec: ChainSpec) -> bool:
    """Whether the node recomputes its conv output in backward instead of saving it: for a ResNet
    stem (one conv whose output is max-pooled), whose conv reads 3 channels — the network's cheapest
    convolution per output element (147 multiply-adds against 576 and more for a 3x3 layer) and its
    largest activation. resnet18, batch 8, 112x112: 6.4 MiB less held through the whole backward for
    a ~4.5 ms forward conv (1 thread)."""
    return spec.pool is not None and len(spec.layers) == 1


def _may_hold() -> bool:
    """Whether a node may keep its conv outputs on ``ctx`` (freed one by one in backward) instead of
    saving them: not while torch.compile traces, nor under saved-tensor hooks
    (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``, activation checkpointing), which
    must see every tensor kept for backward; and only where torch tells a backward whether its graph
    is retained (``_keep_graph``)."""
    hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return (hooks is not None and hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph")
            and not torch.compiler.is_compiling() and hooks(False) is None)


def _keep_graph() -> bool:
    """Whether the running backward retains the graph (``retain_graph=True``): then a held conv
    output must outlive it."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


def _apply_into(apply_, y, owned: bool, grad_out, out, a, b, d, relu: bool):
    """``a[c] * dz + b[c] * y + d[c]`` written over ``y`` when the node owns it (a recomputed or a
    held conv output that is not needed again) and it is dense, else into a new buffer."""
    dense = y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)
    dst = y if owned and dense else torch.empty_like(y, memory_format=_memory_format(y))
    apply_(dst, grad_out, out, y, a, b, d, relu, False)
    return dst


def _cheap(w: torch.Tensor, geom: ConvGeom, y: torch.Tensor) -> bool:
    """Whether recomputing ``y = conv(., w)`` in backward costs at most ``RECOMPUTE_MACS_PER_BYTE``
    multiply-adds per byte of ``y`` not saved."""
    macs = w.shape[1] * w.shape[2] * w.shape[3]  # per output element (w.shape[1] = C_in / groups)
    return macs <= RECOMPUTE_MACS_PER_BYTE * y.element_size()


def _stats_out(L: LayerSpec, mean, unbiased, like):
    """``[mean, unbiased var]`` for the running-stat update (empty tensors for running-stat layers)."""
    if not L.batch_stats:
        return [like.new_empty(0), like.new_empty(0)]
    return [mean, unbiased]


def _put_affine(grads, layer, grad_gamma, grad_beta, dtype):
    if grad_gamma is not None:
        grads[_PER_LAYER * layer + 1] = as_dtype(grad_gamma, dtype)
        grads[_PER_LAYER * layer + 2] = as_dtype(grad_beta, dtype)


def _memory_format(t: torch.Tensor):
    return torch.channels_last if (t.dim() == 4 and not t.is_contiguous()
                                   and t.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
