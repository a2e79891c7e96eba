"""Child-process side of tests/test_distributed.py: one rank of a gloo (CPU) or NCCL (GPU) job.

The parent (the pytest process, which never initialises torch.distributed itself) writes a job file —
initial weights, every rank's inputs, the scenarios to run — starts one process per rank with
:func:`entry` (``multiprocessing`` "spawn" context), and compares what the ranks saved against a
single-process plain-PyTorch oracle. A rank saves ``rank{r}.pt`` (``{scenario: result}``) or, when
it fails, ``rank{r}.err`` (the traceback) and exits with status 1 at once (``os._exit``), so that its
peers see the closed connection (or their process-group timeout) instead of waiting for it.
"""
from __future__ import annotations

import datetime
import functools
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry(rank: int, world: int, port: int, jobfile: str, outdir: str, timeout_s: float,
          backend: str = "gloo") -> None:
    """Process target: init the process group, run every scenario of the job, save the results."""
    import importlib.util
    if importlib.util.find_spec("resfuse") is None:  # the parent's sys.path normally finds it already
        sys.path.append(ROOT)
    import time
    t0 = time.time()
    trace = (lambda *a: print(f"[rank {rank} {time.time() - t0:6.2f}s]", *a, file=sys.stderr, flush=True)) \
        if os.environ.get("RESFUSE_DIST_TRACE") else (lambda *a: None)  # timing of a job, for debugging
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        trace("init_process_group done")
        job = torch.load(jobfile, weights_only=False)
        # every rank creates every group, in the same order (torch.distributed.new_group's contract)
        groups = {name: dist.new_group(ranks) for name, ranks in job.get("groups", {}).items()}
        results = {}
        for sc in job["scenarios"]:
            try:
                results[sc["name"]] = RUNNERS[sc["kind"]](rank, world, sc, groups)
                trace("ran", sc["name"])
            except Exception as e:  # a scenario failing the same way on every rank leaves the others runnable
                if sc.get("propagate"):
                    raise
                results[sc["name"]] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report anything, then die at once
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)


# -- helpers ---------------------------------------------------------------------------------------------
def _norm_layer(group):
    from torch import nn
    return functools.partial(nn.SyncBatchNorm, process_group=group)


def build_blocks(arch, norm_layer, fused: bool):
    """``nn.Sequential`` of BasicBlocks: ``arch`` = [(inplanes, planes, stride, projection), ...]."""
    from torch import nn

    import resfuse
    from resfuse import reference
    cls = resfuse.nn.BasicBlock if fused else reference.BasicBlock
    blocks = []
    for inplanes, planes, stride, proj in arch:
        ds = None
        if proj:
            ds = nn.Sequential(reference.conv1x1(inplanes, planes, stride), norm_layer(planes))
        blocks.append(cls(inplanes, planes, stride, ds, norm_layer=norm_layer))
    return nn.Sequential(*blocks)


class CollectiveCounter:
    """Counts resfuse's collectives (``_all_gather`` and ``sync_grad_sums``' all_reduce) in a rank."""

    def __init__(self):
        import resfuse.distributed as D
        self.D, self.gathers, self.reduces = D, 0, 0
        self._gather, self._reduce = D._all_gather, D.sync_grad_sums

    def __enter__(self):
        D = self.D

        def gather(*a, **k):
            self.gathers += 1
            return self._gather(*a, **k)

        def reduce(s1, s2, group=None):
            if D._collective_size(group):
                self.reduces += 1
            return self._reduce(s1, s2, group)

        D._all_gather, D.sync_grad_sums = gather, reduce
        return self

    def __exit__(self, *exc):
        self.D._all_gather, self.D.sync_grad_sums = self._gather, self._reduce


def _buffers(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


# -- scenario: fused blocks with SyncBatchNorm, no DDP (local gradients summed by the test) --------------
def run_blocks(rank, world, sc, groups):
    import torch
    import torch.distributed as dist

    import resfuse
    from resfuse import backends

    gname = sc["group_of"].get(rank)
    group = groups[gname] if gname is not None else None
    dtype = sc["dtype"]
    model = build_blocks(sc["arch"], _norm_layer(group), fused=True).to(dtype)
    model.load_state_dict(sc["state"])
    model.train()
    out = {"steps": [], "backend": None}
    with resfuse.use_backend(sc.get("backend", "auto")), CollectiveCounter() as cc:
        for step in range(sc["steps"]):
            x = sc["inputs"][step][rank].clone()
            if rank in sc.get("channels_last", ()):
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            g0, r0 = cc.gathers, cc.reduces
            y = model(x)
            out["backend"] = backends.last_used().get("conv_bn_chain")
            (y * sc["gouts"][step][rank]).sum().backward()
            rec = {"out": y.detach().clone(), "grad_x": x.grad.clone(),
                   "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                   "gathers": cc.gathers - g0, "reduces": cc.reduces - r0}
            with torch.no_grad():  # plain SGD on the gradient of the summed loss (like an all_reduce(SUM) DDP)
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.sub_(sc["lr"] * p.grad)
                    p.grad = None
            rec["buffers"] = _buffers(model)
            out["steps"].append(rec)
        model.eval()
        g0 = cc.gathers
        with torch.no_grad():
            out["eval_out"] = model(sc["inputs"][0][rank]).detach().clone()
        out["eval_gathers"] = cc.gathers - g0
    return out


# -- scenario: a whole model under DistributedDataParallel -----------------------------------------------
def _ddp_model(sc):
    from torch import nn

    import resfuse
    from resfuse import reference

    how = sc["model"]
    depth, shortcut = sc["depth"], sc["shortcut"]
    if how == "fused_model":  # resfuse.models + convert_sync_batchnorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(resfuse.models.cifar_resnet(depth, shortcut=shortcut))
    elif how == "fuse_then_sync":  # fuse(reference model), then convert_sync_batchnorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(resfuse.fuse(reference.cifar_resnet(depth, shortcut=shortcut)))
    elif how == "sync_then_fuse":  # convert_sync_batchnorm(reference model), then fuse
        model = resfuse.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(reference.cifar_resnet(depth, shortcut=shortcut)))
    else:
        raise ValueError(how)
    model = model.to(sc["dtype"])
    model.load_state_dict(sc["state"])
    syncs = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if syncs != bns or syncs == 0:
        raise AssertionError(f"{how}: {syncs} SyncBatchNorm of {bns} BatchNorm layers")
    return model


def run_ddp(rank, world, sc, groups):
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import resfuse
    import resfuse.distributed as D
    from resfuse import backends

    try:
        model = _ddp_model(sc)
    except NotImplementedError as e:
        return {"skip": f"resfuse.fuse raised NotImplementedError: {e}"}
    model.train()
    out = {"steps": []}
    if sc.get("check_torch_ddp"):  # torch's own DDP refuses CPU models with SyncBatchNorm (at construction)
        try:
            DDP(model, find_unused_parameters=False)
            out["torch_ddp"] = "accepted"
        except ValueError as e:
            out["torch_ddp"] = str(e)
    ddp = D.DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=sc["lr"], momentum=sc["momentum"])
    with resfuse.use_backend(sc.get("backend", "auto")), CollectiveCounter() as cc:
        for step in range(sc["steps"]):
            x = sc["inputs"][step][rank].clone().requires_grad_(True)
            g0 = cc.gathers
            y = ddp(x)
            gathers = cc.gathers - g0
            loss = F.cross_entropy(y, sc["labels"][step][rank])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            out["steps"].append({"out": y.detach().clone(), "grad_x": x.grad.clone(), "gathers": gathers,
                                 "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
            opt.step()
    out["backend"] = backends.last_used().get("conv_bn_chain")
    out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


# -- scenario: a rank fails in the middle of a forward ---------------------------------------------------
def run_fail(rank, world, sc, groups):
    import torch

    import resfuse
    import resfuse.distributed as D

    model = build_blocks(sc["arch"], _norm_layer(None), fused=True).to(sc["dtype"])
    model.load_state_dict(sc["state"])
    if rank == sc["failing_rank"]:
        real, calls = D.sync_batch_stats, [0]

        def failing(*a, **k):
            calls[0] += 1
            if calls[0] == sc["fail_at_call"]:
                raise RuntimeError(f"injected failure on rank {rank}")
            return real(*a, **k)

        D.sync_batch_stats = failing
    with resfuse.use_backend(sc.get("backend", "auto")):
        for step in range(sc["steps"]):
            x = sc["inputs"][step][rank].clone().requires_grad_(True)
            model(x).sum().backward()
    torch.distributed.barrier()
    return {"finished": True}


# -- scenario: a process group of one rank (gloo on CPU here; NCCL on a GPU in the GPU test) ---------------
def run_world1(rank, world, sc, groups):
    """A group of one rank: the sync is a no-op (no collective) and equals plain BN; the forced collective
    path (``_FORCE_COLLECTIVES``) gives the same numbers; the stats merge agrees with the op nn.SyncBatchNorm
    uses on CUDA (``batch_norm_gather_stats_with_counts``); fused chain == unfused nn.SyncBatchNorm model
    (on CUDA; on CPU nn.SyncBatchNorm refuses to run under torch.distributed, so nn.BatchNorm2d).
    Runs on the ranks ``sc["ranks"]`` with the group ``sc["group"]`` (None = WORLD); other ranks skip it."""
    import torch
    from torch import nn

    import resfuse.distributed as D
    from resfuse import backends
    from resfuse.testing import rel_error

    if rank not in sc["ranks"]:
        return {}
    group = groups[sc["group"]] if sc["group"] is not None else None
    assert D.group_size(group) == 1
    dev = torch.device(sc["device"])
    if dev.type == "cuda":  # compare like with like: no TF32 in either model's convolutions
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    res = {}
    gen = torch.Generator().manual_seed(0)
    C = 6
    for dt in (torch.float32, torch.float64):
        mean = (torch.randn(C, generator=gen, dtype=torch.float64) * 3 + 100).to(dt).to(dev)
        var = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.1).to(dt).to(dev)
        with CollectiveCounter() as cc:
            m1, v1, n1 = D.sync_batch_stats(mean, var, 37, group)
            s1, s2 = D.sync_grad_sums(mean, var, group)
        res[f"noop_{dt}"] = (m1 is mean and v1 is var and n1 == 37 and s1 is mean and s2 is var
                             and cc.gathers == 0 and cc.reduces == 0)
        D._FORCE_COLLECTIVES = True
        try:
            with CollectiveCounter() as cc:
                m2, v2, n2 = D.sync_batch_stats(mean, var, 37, group)
                s1, s2 = D.sync_grad_sums(mean, var, group)
        finally:
            D._FORCE_COLLECTIVES = False
        res[f"forced_{dt}"] = (n2 == 37 and m2.dtype == dt and v2.dtype == dt and m2.device == dev
                               and rel_error(m2, mean) < 1e-15 and rel_error(v2, var) < 1e-12
                               and torch.equal(s1, mean) and torch.equal(s2, var)
                               and cc.gathers == 1 and cc.reduces == 1)
        try:
            D.sync_batch_stats(mean, var, 1, group)
            res[f"count1_{dt}"] = "no error"
        except ValueError as e:
            res[f"count1_{dt}"] = str(e)

    if dev.type == "cuda":  # the merge against the op nn.SyncBatchNorm merges with
        W = 5
        counts = torch.tensor([3., 0., 40., 7., 1.], device=dev)
        means = torch.randn(W, C, device=dev) * 2 + 5
        var_r = torch.rand(W, C, device=dev) + 0.2
        eps = 1e-5
        invstd = torch.rsqrt(var_r + eps)
        keep = counts > 0
        m_t, inv_t = torch.batch_norm_gather_stats_with_counts(
            torch.empty(1, C, 1, 1, device=dev), means[keep], invstd[keep], None, None, 0.1, eps, counts[keep])
        tot, m_o, v_o = D.merge_stats(counts, means, var_r * counts.unsqueeze(1))
        res["merge_vs_torch"] = (int(tot.item()) == 51, rel_error(m_o, m_t),
                                 rel_error(torch.rsqrt(v_o + eps), inv_t))

    # fused chain with SyncBatchNorm (collectives forced) vs the unfused model
    torch.manual_seed(0)
    arch = [(8, 8, 1, False), (8, 16, 2, True)]
    ref_norm = _norm_layer(group) if dev.type == "cuda" else nn.BatchNorm2d
    ref = build_blocks(arch, ref_norm, fused=False).to(dev)
    fused = build_blocks(arch, _norm_layer(group), fused=True).to(dev)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(6, 8, 12, 12, device=dev)
    gout = torch.randn(6, 16, 6, 6, device=dev)
    errs = {}
    D._FORCE_COLLECTIVES = True
    try:
        with CollectiveCounter() as cc:
            for step in range(3):
                xs = [x.clone().requires_grad_(True) for _ in range(2)]
                outs = [ref(xs[0]), fused(xs[1])]
                for o in outs:
                    (o * gout).sum().backward()
                errs[f"out{step}"] = rel_error(outs[1], outs[0])
                errs[f"grad_x{step}"] = rel_error(xs[1].grad, xs[0].grad)
                for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
                    errs[f"grad.{n}.{step}"] = rel_error(q.grad, p.grad)
                with torch.no_grad():
                    for p, q in zip(ref.parameters(), fused.parameters()):
                        p.sub_(0.1 * p.grad)
                        q.sub_(0.1 * q.grad)
                        p.grad = q.grad = None
        res["chain_backend"] = backends.last_used().get("conv_bn_chain")
        res["chain_collectives"] = (cc.gathers, cc.reduces)
    finally:
        D._FORCE_COLLECTIVES = False
    rs, fs = ref.state_dict(), fused.state_dict()
    for k in rs:
        if "running" in k or "num_batches" in k:
            errs[f"buffer.{k}"] = rel_error(fs[k].double(), rs[k].double())
    res["chain_errors"] = errs
    return res


RUNNERS = {"blocks": run_blocks, "ddp": run_ddp, "fail": run_fail, "world1": run_world1}
