"""Synchronised BatchNorm in the fused chain and DDP, on torch.distributed (gloo on CPU, NCCL on a GPU).

The ranks are real processes (``multiprocessing`` spawn, ``tcp://127.0.0.1``, gloo, 60 s process-group
timeout, bounded joins); their code is ``tests/dist_worker.py``. This process never initialises
torch.distributed: it writes the jobs (initial weights, every rank's inputs), runs them, and compares
what the ranks saved against the *definition* of SyncBatchNorm — plain ``nn.BatchNorm2d`` over the union
of the ranks' batches, in one process, with the same initial weights (``nn.SyncBatchNorm`` itself refuses
CPU tensors under torch.distributed; the GPU test compares against it directly).

Gradient conventions checked:
* no DDP (``blocks`` scenarios): a rank's parameter gradients are its *local* contributions, as
  ``nn.SyncBatchNorm`` makes them (its weight/bias gradients are local; "DDP does the all_reduce"), so
  their sum over ranks is the single-process gradient of ``Σ_r loss_r``; input gradients are those of
  ``Σ_r loss_r`` (the backward all_reduce carries the cross-rank terms);
* DDP: it *averages* gradients, so every rank holds the single-process gradient of ``(1/W) Σ_r loss_r``
  (each ``loss_r`` a mean over rank r's own samples — with unequal batch sizes that is not the mean over
  the concatenated batch); input gradients stay those of ``Σ_r loss_r``.

Jobs (one launch each): 2 ranks (fused blocks in float64/float32 with unequal batch and spatial sizes,
channels_last on one rank; cifar_resnet(8) at 16×16 under DDP, built three ways), 3 ranks (all three
synchronised; a ``process_group`` {0, 1} with rank 2 outside it or alone in its own group; a rank with
an empty batch), and 2 ranks of which one fails mid-forward. Set RESFUSE_DIST_TRACE=1 to see the ranks'
timings on stderr.

CPU DDP: torch's ``DistributedDataParallel`` refuses CPU models holding ``nn.SyncBatchNorm``; the tests use
``resfuse.distributed.DistributedDataParallel``, which lifts that one check (the fused chains synchronise
the layers on gloo).
"""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import resfuse.distributed as D
from resfuse import backends, reference
from resfuse.testing import rel_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker

PG_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 120

needs_dist = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
needs_cpu_backend = pytest.mark.skipif(
    backends.instance("cpu")[0] is None,
    reason="the fused chain on CPU needs resfuse's C++ extension (cpu backend): "
           f"{backends.instance('cpu')[1]}")


# -- launching ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch(NamedTuple):
    exitcodes: list
    elapsed: float
    hung: list  # ranks still alive at the join deadline (killed)
    results: dict  # rank -> {scenario: result}
    errors: dict  # rank -> traceback text

    def describe(self) -> str:
        return (f"exit codes {self.exitcodes}, {self.elapsed:.1f} s, hung ranks {self.hung}\n"
                + "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(self.errors.items())))


def launch(world: int, job: dict, tmp: Path, pg_timeout_s: float = PG_TIMEOUT_S,
           join_timeout_s: float = JOIN_TIMEOUT_S, backend: str = "gloo") -> Launch:
    """Run ``job`` on ``world`` fresh processes; never waits longer than ``join_timeout_s``."""
    tmp.mkdir(parents=True, exist_ok=True)
    jobfile = tmp / "job.pt"
    torch.save(job, jobfile)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=dist_worker.entry,
                         args=(r, world, port, str(jobfile), str(tmp), pg_timeout_s, backend))
             for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    deadline = t0 + join_timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - t0
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(10)
    results, errors = {}, {}
    for r in range(world):
        if (tmp / f"rank{r}.pt").exists():
            results[r] = torch.load(tmp / f"rank{r}.pt", weights_only=False)
        if (tmp / f"rank{r}.err").exists():
            errors[r] = (tmp / f"rank{r}.err").read_text()
    return Launch([p.exitcode for p in procs], elapsed, hung, results, errors)


def scenario_result(run: Launch, name: str, world: int) -> list:
    """Every rank's result of scenario ``name`` (fails with the ranks' tracebacks if a rank failed)."""
    if run.hung or any(c != 0 for c in run.exitcodes) or len(run.results) != world:
        pytest.fail("distributed job failed: " + run.describe())
    res = [run.results[r][name] for r in range(world)]
    for r, x in enumerate(res):
        if "error" in x:
            pytest.fail(f"scenario {name}, rank {r}: {x['error']}")
    return res


class Checker:
    """Collects every mismatch so that one failure shows all of them."""

    def __init__(self, tol: float):
        self.tol, self.bad, self.worst = tol, [], 0.0

    def __call__(self, what: str, actual, expected, tol=None):
        tol = self.tol if tol is None else tol
        if isinstance(actual, torch.Tensor) and actual.dtype == torch.int64:
            if not torch.equal(actual, expected):
                self.bad.append(f"{what}: {actual.tolist()} != {expected.tolist()}")
            return
        err = rel_error(actual, expected)
        self.worst = max(self.worst, err)
        if not err <= tol:
            self.bad.append(f"{what}: relative error {err:.3e} > {tol:.1e}")

    def done(self):
        assert not self.bad, f"{len(self.bad)} mismatches:\n" + "\n".join(self.bad[:40])


# -- the oracle: BN over the union of the ranks' batches -------------------------------------------------
def union_bn(bn: nn.BatchNorm2d, ys: list) -> list:
    """``bn`` applied to all of ``ys`` as one batch (the ranks' tensors may differ in N, H and W)."""
    c = ys[0].shape[1]
    flat = torch.cat([y.transpose(0, 1).reshape(c, -1) for y in ys], 1)  # [C, Σ N·H·W]
    z = bn(flat[None, :, :, None]).reshape(c, -1)
    outs, off = [], 0
    for y in ys:
        n = y.numel() // c
        outs.append(z[:, off:off + n].reshape(c, y.shape[0], y.shape[2], y.shape[3]).transpose(0, 1))
        off += n
    return outs


def union_block(blk, xs: list) -> list:
    """A reference BasicBlock run on the ranks' inputs ``xs`` with union-batch BN."""
    a = [torch.relu(t) for t in union_bn(blk.bn1, [blk.conv1(x) for x in xs])]
    z = union_bn(blk.bn2, [blk.conv2(t) for t in a])
    sc = xs if blk.downsample is None else union_bn(blk.downsample[1], [blk.downsample[0](x) for x in xs])
    return [torch.relu(u + s) for u, s in zip(z, sc)]


def perturb_(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN affine parameters and running statistics (defaults 1/0 would hide mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(3)
    return model


def _randn(shape, gen, dtype, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


ARCH = [(4, 4, 1, False), (4, 8, 2, True)]  # identity-shortcut block, projection-shortcut block (stride 2)
BN_LAYERS = 5


def blocks_scenario(name, dtype, shapes, partitions, group_of=None, steps=3, channels_last=(), seed=0,
                    offset=0.0):
    """``shapes[r] = (N, H, W)`` of rank r's input; ``partitions``: the sets of ranks that synchronise."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = perturb_(dist_worker.build_blocks(ARCH, nn.BatchNorm2d, fused=False), gen).to(dtype)
    inputs = [[_randn((n, ARCH[0][0], h, w), gen, dtype, 2.0, offset) for (n, h, w) in shapes] for _ in range(steps)]
    gouts = [[_randn((n, ARCH[-1][1], (h + 1) // 2, (w + 1) // 2), gen, dtype) for (n, h, w) in shapes]
             for _ in range(steps)]
    return {"name": name, "kind": "blocks", "arch": ARCH, "dtype": dtype, "steps": steps, "lr": 0.05,
            "state": {k: v.clone() for k, v in model.state_dict().items()}, "inputs": inputs, "gouts": gouts,
            "group_of": group_of or {}, "channels_last": tuple(channels_last), "partitions": partitions}


def ddp_scenario(name, how, dtype, batch, shortcut="B", steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = perturb_(reference.cifar_resnet(8, shortcut=shortcut), gen).to(dtype)
    inputs = [[_randn((n, 3, 16, 16), gen, dtype) for n in batch] for _ in range(steps)]
    labels = [[torch.randint(0, 10, (n,), generator=gen) for n in batch] for _ in range(steps)]
    return {"name": name, "kind": "ddp", "model": how, "depth": 8, "shortcut": shortcut, "dtype": dtype,
            "steps": steps, "lr": 0.1, "momentum": 0.9, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "inputs": inputs, "labels": labels}


TOL = {torch.float64: 1e-9, torch.float32: 2e-4}

JOB2 = {"scenarios": [
    blocks_scenario("blocks64", torch.float64, [(3, 8, 8), (5, 6, 6)], [[0, 1]]),
    blocks_scenario("blocks32", torch.float32, [(2, 8, 8), (6, 8, 8)], [[0, 1]], channels_last=[1], offset=3.0),
    dict(ddp_scenario("ddp_fused_model", "fused_model", torch.float64, [3, 5]), check_torch_ddp=True),
    ddp_scenario("ddp_fused_model32_A", "fused_model", torch.float32, [4, 2], shortcut="A"),
    ddp_scenario("ddp_fuse_then_sync", "fuse_then_sync", torch.float64, [3, 5]),
    ddp_scenario("ddp_sync_then_fuse", "sync_then_fuse", torch.float64, [3, 5]),
]}
JOB3 = {"groups": {"g01": [0, 1], "g2": [2]}, "scenarios": [
    blocks_scenario("world3", torch.float64, [(2, 8, 8), (4, 6, 6), (3, 10, 10)], [[0, 1, 2]], seed=3),
    # rank 2 is not in the group {0, 1}: it normalises with its own statistics (as nn.SyncBatchNorm does)
    blocks_scenario("subset_nonmember", torch.float64, [(2, 8, 8), (4, 6, 6), (3, 10, 10)], [[0, 1], [2]],
                    group_of={0: "g01", 1: "g01", 2: "g01"}, seed=4),
    # subgroups {0, 1} and {2} (a group of one rank: no collective at all)
    blocks_scenario("subgroups", torch.float64, [(2, 8, 8), (4, 6, 6), (3, 10, 10)], [[0, 1], [2]],
                    group_of={0: "g01", 1: "g01", 2: "g2"}, seed=5),
    # rank 1 has an empty batch: it takes part in every collective with a zero count
    blocks_scenario("empty_rank", torch.float64, [(2, 8, 8), (0, 8, 8), (3, 8, 8)], [[0, 1, 2]], seed=6),
    # rank 2 alone in its group (the code of the NCCL world-size-1 GPU test, run here on gloo)
    {"name": "world1", "kind": "world1", "device": "cpu", "ranks": [2], "group": "g2"},
]}
SCENARIOS2 = [s["name"] for s in JOB2["scenarios"]]
SCENARIOS3 = [s["name"] for s in JOB3["scenarios"] if s["kind"] == "blocks"]
BLOCKS = {s["name"]: s for s in JOB2["scenarios"] + JOB3["scenarios"]}


@pytest.fixture(scope="module")
def job2(tmp_path_factory):
    return launch(2, JOB2, tmp_path_factory.mktemp("dist2"))


@pytest.fixture(scope="module")
def job3(tmp_path_factory):
    return launch(3, JOB3, tmp_path_factory.mktemp("dist3"))


# -- in-process tests (torch.distributed not initialised) -----------------------------------------------
def _var_mean(parts):
    x = torch.cat(parts, 0).to(torch.float64)
    v, m = torch.var_mean(x, 0, unbiased=False)
    return m, v


@pytest.mark.parametrize("sizes", [[5, 5], [1, 7, 3], [4, 0, 9], [0, 6], [1000, 1]])
def test_merge_stats_equals_union(sizes):
    C = 3
    parts = [torch.randn(n, C, dtype=torch.float64) * (i + 1) + 10 * i for i, n in enumerate(sizes)]
    counts = torch.tensor(sizes, dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.full((C,), float("nan"), dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.full((C,), float("nan"), dtype=torch.float64)
                       for p in parts])
    total, mean, var = D.merge_stats(counts, means, m2s)
    m, v = _var_mean(parts)
    assert int(total) == sum(sizes)
    assert rel_error(mean, m) < 1e-14 and rel_error(var, v) < 1e-13


def test_merge_stats_is_numerically_safe():
    """float32 partials of data with |mean| >> std: the merge keeps the variance; raw sums would not."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 4, generator=gen, dtype=torch.float64) * 0.1 + 1e3 for n in (300, 500, 200)]
    means = torch.stack([p.mean(0) for p in parts]).float()
    vars_ = torch.stack([p.var(0, unbiased=False) for p in parts]).float()
    counts = torch.tensor([300., 500., 200.])
    _, mean, var = D.merge_stats(counts, means, vars_.double() * counts.double()[:, None])
    m, v = _var_mean(parts)
    assert rel_error(var, v) < 1e-4 and rel_error(mean, m) < 1e-7  # float32 rounding of the partials only
    # what an all_reduce of raw fp32 sums (Σx, Σx²) would give: the variance is lost entirely
    s1 = (means * counts[:, None]).sum(0)
    s2 = ((vars_ + means ** 2) * counts[:, None]).sum(0)
    raw = s2 / counts.sum() - (s1 / counts.sum()) ** 2
    assert rel_error(raw.double(), v) > 0.1


def test_merge_stats_all_empty():
    total, mean, var = D.merge_stats(torch.zeros(2), torch.full((2, 3), float("nan")), torch.full((2, 3), float("nan")))
    assert int(total) == 0 and torch.equal(mean, torch.zeros(3, dtype=torch.float64)) and torch.equal(var, mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_process_group_is_a_noop(dtype):
    assert not torch.distributed.is_initialized()
    mean, var = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype)
    m, v, n = D.sync_batch_stats(mean, var, 12, None)
    assert m is mean and v is var and n == 12 and D.group_size(None) == 1
    a, b = D.sync_grad_sums(mean, var, None)
    assert a is mean and b is var
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        D.sync_batch_stats(mean, var, 1, None)


def test_bad_arguments():
    with pytest.raises(ValueError, match="one shape"):
        D.sync_batch_stats(torch.zeros(3), torch.zeros(4), 5)
    with pytest.raises(TypeError, match="floating point"):
        D.sync_grad_sums(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))


# -- fused blocks with SyncBatchNorm, no DDP --------------------------------------------------------------
def check_blocks(res: list, sc: dict):
    world = len(res)
    dtype = sc["dtype"]
    chk = Checker(TOL[dtype])
    assert {r["backend"] for r in res} - {None} <= {"cpu"}, [r["backend"] for r in res]
    # one reference model per synchronising set of ranks; all share the parameters (summed gradients)
    refs = {}
    for part in sc["partitions"]:
        m = dist_worker.build_blocks(sc["arch"], nn.BatchNorm2d, fused=False).to(torch.float64)
        m.load_state_dict({k: v.to(torch.float64) if v.is_floating_point() else v for k, v in sc["state"].items()})
        refs[tuple(part)] = m.train()
    part_of = {r: p for p in refs for r in p}
    for step in range(sc["steps"]):
        xs = {r: sc["inputs"][step][r].to(torch.float64).requires_grad_(True) for r in range(world)}
        outs, loss = {}, 0
        for part, m in refs.items():
            h = [xs[r] for r in part]
            for blk in m:
                h = union_block(blk, h)
            for r, o in zip(part, h):
                outs[r] = o
                loss = loss + (o * sc["gouts"][step][r].to(torch.float64)).sum()
        loss.backward()
        for r in range(world):
            got = res[r]["steps"][step]
            chk(f"step {step} rank {r} output", got["out"], outs[r])
            chk(f"step {step} rank {r} grad_input", got["grad_x"], xs[r].grad)
        names = [n for n, _ in next(iter(refs.values())).named_parameters()]
        for i, name in enumerate(names):
            total = sum(list(m.parameters())[i].grad for m in refs.values())
            summed = sum(res[r]["steps"][step]["grads"][name].to(torch.float64) for r in range(world))
            chk(f"step {step} grad {name} (sum over ranks)", summed, total)
        with torch.no_grad():
            for i in range(len(names)):
                ps = [list(m.parameters())[i] for m in refs.values()]
                g = sum(p.grad for p in ps)
                for p in ps:
                    p.sub_(sc["lr"] * g)
                    p.grad = None
        for r in range(world):
            ref_buf = dist_worker._buffers(refs[part_of[r]])
            for k, v in res[r]["steps"][step]["buffers"].items():
                chk(f"step {step} rank {r} {k}", v if v.dtype == torch.int64 else v.to(torch.float64), ref_buf[k])
    for r in range(world):  # eval mode: the running statistics, no collective
        m = refs[part_of[r]].eval()
        with torch.no_grad():
            chk(f"rank {r} eval output", res[r]["eval_out"], m(sc["inputs"][0][r].to(torch.float64)))
    chk.done()


@needs_dist
@needs_cpu_backend
@pytest.mark.parametrize("name", [n for n in SCENARIOS2 if BLOCKS[n]["kind"] == "blocks"])
def test_blocks_two_ranks(job2, name):
    check_blocks(scenario_result(job2, name, 2), BLOCKS[name])


@needs_dist
@needs_cpu_backend
@pytest.mark.parametrize("name", SCENARIOS3)
def test_blocks_three_ranks(job3, name):
    check_blocks(scenario_result(job3, name, 3), BLOCKS[name])


@needs_dist
@needs_cpu_backend
def test_one_collective_per_layer(job2, job3):
    """Forward: one all_gather per synchronised BN layer; backward: one all_reduce per layer; eval: none.
    Ranks outside the group, or alone in theirs, make no collective call."""
    for run, world, names in ((job2, 2, ["blocks64", "blocks32"]), (job3, 3, SCENARIOS3)):
        for name in names:
            for r, res in enumerate(scenario_result(run, name, world)):
                synced = len([p for p in BLOCKS[name]["partitions"] if r in p and len(p) > 1]) > 0
                want = BN_LAYERS if synced else 0
                for step in res["steps"]:
                    assert (step["gathers"], step["reduces"]) == (want, want), (name, r, step["gathers"], step["reduces"])
                assert res["eval_gathers"] == 0


# -- whole models under DistributedDataParallel ---------------------------------------------------------
@needs_dist
@needs_cpu_backend
@pytest.mark.parametrize("name", [n for n in SCENARIOS2 if BLOCKS[n]["kind"] == "ddp"])
def test_ddp(job2, name):
    sc = BLOCKS[name]
    res = scenario_result(job2, name, 2)
    if any("skip" in r for r in res):
        pytest.skip(res[0].get("skip") or res[1].get("skip"))
    assert {r["backend"] for r in res} == {"cpu"}, [r["backend"] for r in res]
    if sc.get("check_torch_ddp"):  # why resfuse.distributed.DistributedDataParallel exists (CPU only)
        assert all("only work with GPU modules" in r["torch_ddp"] for r in res), [r["torch_ddp"] for r in res]
    world, dtype = 2, sc["dtype"]
    chk = Checker(TOL[dtype])
    torch.manual_seed(0)
    ref = reference.cifar_resnet(sc["depth"], shortcut=sc["shortcut"]).to(torch.float64)
    ref.load_state_dict(sc["state"])
    ref.train()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    opt = torch.optim.SGD(ref.parameters(), lr=sc["lr"], momentum=sc["momentum"])
    for step in range(sc["steps"]):
        xs = [t.to(torch.float64) for t in sc["inputs"][step]]
        x = torch.cat(xs).requires_grad_(True)
        out = ref(x)
        outs = out.split([len(t) for t in xs])
        # DDP averages the ranks' gradients: the single-process loss is the mean of the per-rank losses
        loss = sum(F.cross_entropy(o, y) for o, y in zip(outs, sc["labels"][step])) / world
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gx = (x.grad * world).split([len(t) for t in xs])  # input gradients are those of Σ_r loss_r
        for r in range(world):
            got = res[r]["steps"][step]
            assert got["gathers"] == n_bn
            chk(f"step {step} rank {r} output", got["out"], outs[r])
            chk(f"step {step} rank {r} grad_input", got["grad_x"], gx[r])
            for n, p in ref.named_parameters():
                chk(f"step {step} rank {r} grad {n}", got["grads"][n], p.grad)
        opt.step()
    for r in range(world):
        for k, v in ref.state_dict().items():
            got = res[r]["state"][k]
            chk(f"rank {r} final {k}", got if got.dtype == torch.int64 else got.to(torch.float64), v)
    chk.done()


# -- failure: a rank raising must not leave the others hanging ------------------------------------------
@needs_dist
@needs_cpu_backend
def test_rank_failure_raises_on_all_ranks(tmp_path):
    sc = blocks_scenario("fail", torch.float32, [(2, 8, 8), (3, 8, 8)], [[0, 1]], steps=2)
    sc.update(kind="fail", failing_rank=1, fail_at_call=2, propagate=True)  # rank 1 dies in layer 2's sync
    timeout = 10
    run = launch(2, {"scenarios": [sc]}, tmp_path, pg_timeout_s=timeout, join_timeout_s=60)
    assert not run.hung, "ranks still running at the deadline: " + run.describe()
    assert all(c not in (0, None) for c in run.exitcodes), run.describe()
    assert run.elapsed < 4 * timeout + 20, run.describe()
    assert "injected failure on rank 1" in run.errors.get(1, ""), run.describe()
    assert 0 in run.errors, run.describe()  # rank 0 raised too (gloo: connection closed / timeout)


# -- world size 1 -----------------------------------------------------------------------------------------
def check_world1(res: dict, tol: float, device: str):
    for dt in ("torch.float32", "torch.float64"):
        assert res[f"noop_{dt}"] is True, "world size 1 must be a no-op without collectives"
        assert res[f"forced_{dt}"] is True, "the forced collective path must reproduce the local stats"
        assert "more than 1 value per channel" in res[f"count1_{dt}"]
    if device == "cuda":
        total_ok, err_mean, err_invstd = res["merge_vs_torch"]
        assert total_ok and err_mean < 1e-6 and err_invstd < 1e-5, res["merge_vs_torch"]
    assert res["chain_backend"] == device, res["chain_backend"]
    assert res["chain_collectives"] == (3 * BN_LAYERS, 3 * BN_LAYERS)
    bad = {k: v for k, v in res["chain_errors"].items() if not v <= tol}
    assert not bad, bad


@needs_dist
@needs_cpu_backend
def test_group_of_one_rank(job3):
    check_world1(scenario_result(job3, "world1", 3)[2], 1e-4, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_world_size_one_vs_syncbatchnorm(tmp_path):
    """NCCL on one GPU: our collectives (forced at world size 1), our merge vs the op nn.SyncBatchNorm
    merges with, and fused blocks with SyncBatchNorm vs unfused ``nn.SyncBatchNorm`` blocks."""
    if not torch.distributed.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    if backends.instance("cuda")[0] is None and backends.instance("triton")[0] is None:
        pytest.skip(f"no GPU backend: cuda: {backends.instance('cuda')[1]}; triton: {backends.instance('triton')[1]}")
    sc = {"name": "world1", "kind": "world1", "device": "cuda", "ranks": [0], "group": None}
    run = launch(1, {"scenarios": [sc]}, tmp_path, backend="nccl")
    res = scenario_result(run, "world1", 1)[0]
    res["chain_backend"] = "cuda" if res["chain_backend"] in ("cuda", "triton") else res["chain_backend"]
    check_world1(res, 2e-3, "cuda")  # TF32 off in both models; Triton kernels may still use it
