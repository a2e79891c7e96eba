"""The one registry of resfuse's Triton kernels: launch configs per kernel and arch, the variants the
launchers can produce, and the deterministic shape-keyed choice of a config.

The launchers (``conv.py``, ``bn_act.py``) pick their config here with :func:`pick`; ``python -m
resfuse.aot`` enumerates :func:`aot_units` (every kernel x variant x dtype x config x arch) and compiles
each ahead of time. Keeping both on this table is what makes "the AOT report covers everything the
launcher can run" true by construction: a config or a flag combination the launcher can choose and the
AOT tool does not compile cannot exist.

No torch import here (the AOT worker processes import this module).

Vocabulary
----------
* ``dtype`` (compute dtype): ``"fp32"`` (IEEE fp32 dot), ``"tf32"`` (fp32 tensors, TF32 tensor-core
  dot), ``"bf16"``, ``"fp16"``. Elementwise/reduction kernels have no tf32 variant.
* ``variant``: a dict of the kernel's constexpr *fusion* flags (tile sizes are in the config).
* ``Config``: named tile parameters (constexpr) + ``num_warps``/``num_stages``, with the dtypes and the
  variant flags it applies to (``when``).
"""
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ARCHS = (80, 90)
ARCH_NAMES = {80: "sm_80 (A100)", 90: "sm_90a (H100/H200)"}
DTYPES = ("fp32", "tf32", "bf16", "fp16")
ELEMENTWISE_DTYPES = ("fp32", "bf16", "fp16")
TRITON_TYPE = {"fp32": "fp32", "tf32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Config:
    name: str
    meta: tuple[tuple[str, object], ...]  # constexpr tile parameters, sorted
    num_warps: int
    num_stages: int
    dtypes: tuple[str, ...] = DTYPES
    when: tuple[tuple[str, object], ...] = ()  # variant flags this config is restricted to
    hot: bool | None = None  # overrides the kernel's ``hot`` (None: inherit)

    def kwargs(self) -> dict:
        return dict(self.meta)

    def __getitem__(self, key):
        return dict(self.meta)[key]

    def applies(self, variant: dict, dtype: str) -> bool:
        if dtype not in self.dtypes:
            return False
        return all(variant.get(k) == v for k, v in self.when)


def cfg(name, num_warps, num_stages, dtypes=DTYPES, when=None, hot=None, **meta) -> Config:
    return Config(name, tuple(sorted(meta.items())), num_warps, num_stages, tuple(dtypes),
                  tuple(sorted((when or {}).items())), hot)


@dataclass
class KernelSpec:
    """One Triton kernel of resfuse, as the AOT tool and the launchers see it."""
    name: str
    module: str                 # module defining ``attr`` (a LazyKernel)
    attr: str
    hot: bool                   # a register spill here fails ``resfuse.aot``
    dtypes: tuple[str, ...]
    variants: list[dict]        # every fusion-flag combination a launcher can produce
    configs: dict[int, list[Config]]
    pointer_types: Callable[[str], dict[str, str]]   # dtype -> {pointer arg: triton element type}
    floats: tuple[str, ...] = ()                     # fp32 scalar args
    div16: Callable[[dict], Sequence[str]] = lambda v: ()  # int args assumed divisible by 16
    constexpr_of_dtype: Callable[[str], dict] = lambda d: {}
    doc: str = ""

    def kernel(self):
        import importlib
        return getattr(importlib.import_module(self.module), self.attr)

    def configs_for(self, arch: int, variant: dict, dtype: str) -> list[Config]:
        return [c for c in self.configs[arch] if c.applies(variant, dtype)]


# --------------------------------------------------------------------------------------------------
# Implicit-GEMM convolution
# --------------------------------------------------------------------------------------------------
# Tile choice (see benchmarks/NOTES.md for the reasoning and what has to be measured):
#  * 16-bit: BLOCK_K=64 (128 B rows: one 128-byte swizzle line of bf16, the wgmma/ldmatrix sweet spot),
#    128x128 / 8 warps for large C_out (two consumer warpgroups of m64 on Hopper), 128x64 / 4 warps for
#    C_out <= 64 (stage 1 of ResNet), 64x64 / 4 warps when 128-row tiles would leave SMs idle.
#    sm_80 uses BLOCK_K=32 for 128x128 and BLOCK_K=64 elsewhere (what ptxas 12.8 and 12.9 both
#    compiled without spills).
#  * tf32: same shapes with BLOCK_K=32 (same bytes per K step as bf16 BK=64); on sm_80 the 128x64 tile
#    spilled (ptxas 12.8 or 12.9 depending on the variant), so it is 64x128 there.
#  * fp32 IEEE: no tensor cores (FMA dot); 64x64x16 / 4 warps (32x64 on sm_80): BLOCK_K=32 spills (the
#    FMA dot keeps a whole K slice of both operands in registers).
#  * FLAT_K (C_in < 16, i.e. the stem): one config per dtype, BLOCK_K=32 over the joint (kh, kw, ci) axis;
#    8 warps: the gathered (kh, kw, ci) index math of a 128x32 tile spilled on 4 warps.
# Every choice here was checked spill-free for every variant with `python -m resfuse.aot`.
_CONV_TILES = {
    90: [
        ("m128n128k64_w8_s4", 128, 128, 64, 8, 4, ("bf16", "fp16")),
        ("m128n64k64_w4_s4", 128, 64, 64, 4, 4, ("bf16", "fp16")),
        ("m64n64k64_w4_s3", 64, 64, 64, 4, 3, ("bf16", "fp16")),
        ("m128n128k32_w8_s4", 128, 128, 32, 8, 4, ("tf32",)),
        ("m128n64k32_w4_s4", 128, 64, 32, 4, 4, ("tf32",)),
        ("m64n64k32_w4_s3", 64, 64, 32, 4, 3, ("tf32",)),
        ("m64n64k16_w4_s2", 64, 64, 16, 4, 2, ("fp32",)),
    ],
    80: [
        ("m128n128k32_w8_s4", 128, 128, 32, 8, 4, ("bf16", "fp16")),
        ("m128n64k64_w4_s3", 128, 64, 64, 4, 3, ("bf16", "fp16")),
        ("m64n64k64_w4_s3", 64, 64, 64, 4, 3, ("bf16", "fp16")),
        ("m128n128k32_w8_s3", 128, 128, 32, 8, 3, ("tf32",)),
        ("m64n128k32_w4_s3", 64, 128, 32, 4, 3, ("tf32",)),
        ("m64n64k32_w4_s3", 64, 64, 32, 4, 3, ("tf32",)),
        ("m32n64k16_w4_s2", 32, 64, 16, 4, 2, ("fp32",)),
    ],
}
_CONV_FLAT_TILES = {
    90: [("flat_m128n64k32_w8_s3", 128, 64, 32, 8, 3, ("bf16", "fp16", "tf32")),
         ("flat_m64n64k16_w4_s2", 64, 64, 16, 4, 2, ("fp32",))],
    80: [("flat_m128n64k32_w8_s3", 128, 64, 32, 8, 3, ("bf16", "fp16", "tf32")),
         ("flat_m64n64k16_w4_s2", 64, 64, 16, 4, 2, ("fp32",))],
}
FLAT_K_MAX_CIN = 16  # C_in below this uses the flat-K loop


def _conv_configs(arch):
    # IEEE fp32 (FMA dot, no tensor cores) is the exactness path, not a speed path: not "hot", so a
    # few bytes of ptxas spill there are reported by resfuse.aot but do not fail it.
    out = []
    for name, bm, bn, bk, w, s, dts in _CONV_TILES[arch]:
        out.append(cfg(name, w, s, dts, {"FLAT_K": 0}, False if dts == ("fp32",) else None,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8))
    for name, bm, bn, bk, w, s, dts in _CONV_FLAT_TILES[arch]:
        out.append(cfg(name, w, s, dts, {"FLAT_K": 1}, False if dts == ("fp32",) else None,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8))
    return out


def conv_flag_combos() -> list[dict]:
    """Every flag combination ``conv.conv2d`` can launch (it enforces the same rules):
    ``EPILOGUE`` (bias / scale+shift, the inference form) excludes ``PROLOGUE`` and ``STATS``."""
    out = []
    for flat in (0, 1):
        for pro, stats, res in itertools.product((0, 1), (0, 1), (0, 1)):
            out.append(dict(PROLOGUE=pro, EPILOGUE=0, HAS_RES=res, STATS=stats, FLAT_K=flat))
        for epi, res in itertools.product((1, 2), (0, 1)):
            out.append(dict(PROLOGUE=0, EPILOGUE=epi, HAS_RES=res, STATS=0, FLAT_K=flat))
    return out


def _conv_ptr_types(dtype):
    t = TRITON_TYPE[dtype]
    return {"X": t, "WP": t, "Y": t, "RES": t, "PRO_SCALE": "fp32", "PRO_SHIFT": "fp32",
            "EPI_SCALE": "fp32", "EPI_SHIFT": "fp32", "PART": "fp32", "PCOUNT": "fp32"}


def _conv_div16(variant):
    # The ResNet case: channel counts multiple of 16 (except the flat-K stem, C_in = 3).
    if variant.get("FLAT_K"):
        return ("C_OUT", "res_ps", "c_res")
    return ("C_IN", "C_OUT", "K_TOT", "res_ps", "c_res")


CONV = KernelSpec(
    name="conv2d_fwd", module="resfuse.triton.conv_kernels", attr="conv2d_fwd_kernel", hot=True,
    dtypes=DTYPES, variants=conv_flag_combos(), configs={a: _conv_configs(a) for a in ARCHS},
    pointer_types=_conv_ptr_types, floats=("pro_lo", "out_lo"), div16=_conv_div16,
    constexpr_of_dtype=lambda d: {"PRECISION": "tf32" if d == "tf32" else "ieee"},
    doc="implicit-GEMM conv2d, NHWC, prologue BN-apply+ReLU, epilogue bias/affine+residual+ReLU+stats")

STATS_MERGE = KernelSpec(
    name="stats_merge", module="resfuse.triton.conv_kernels", attr="stats_merge_kernel", hot=False,
    dtypes=("fp32",), variants=[{}],
    configs={a: [cfg("t32c64_w4", 4, 1, ("fp32",), BLOCK_T=32, BLOCK_C=64)] for a in ARCHS},
    pointer_types=lambda d: {"PART": "fp32", "PCOUNT": "fp32", "MEAN": "fp32", "VAR": "fp32"},
    div16=lambda v: ("C",), doc="Chan merge of per-tile (count, mean, M2) partials")


# --------------------------------------------------------------------------------------------------
# BatchNorm elementwise / reduction kernels (bn_kernels.py)
# --------------------------------------------------------------------------------------------------
def _layouts(extra=None):
    out = []
    for cl in (1, 0):
        if extra is None:
            out.append({"CL": cl})
        else:
            for e in extra:
                d = {"CL": cl}
                d.update(e)
                out.append(d)
    return out


# reduction tiles: channels_last wants channels along the fast axis, NCHW wants spatial positions.
_RED_CONFIGS = [cfg("cl_r32c64_w4", 4, 1, ELEMENTWISE_DTYPES, {"CL": 1}, BLOCK_R=32, BLOCK_C=64),
                cfg("nchw_r256c4_w4", 4, 1, ELEMENTWISE_DTYPES, {"CL": 0}, BLOCK_R=256, BLOCK_C=4)]
_EW_CONFIGS = [cfg("b2048_w8", 8, 1, ELEMENTWISE_DTYPES, BLOCK=2048)]

BN_STATS = KernelSpec(
    name="bn_stats_partial", module="resfuse.triton.bn_kernels", attr="bn_stats_partial_kernel", hot=True,
    dtypes=ELEMENTWISE_DTYPES, variants=_layouts(), configs={a: list(_RED_CONFIGS) for a in ARCHS},
    pointer_types=lambda d: {"X": TRITON_TYPE[d], "PART": "fp32", "PCOUNT": "fp32"},
    div16=lambda v: ("C",), doc="per-program Welford (count, mean, M2) partials of x per channel")

BN_ACT = KernelSpec(
    name="bn_act", module="resfuse.triton.bn_kernels", attr="bn_act_kernel", hot=True,
    dtypes=ELEMENTWISE_DTYPES,
    variants=_layouts([{"RES": r} for r in (0, 1, 2)]),
    configs={a: list(_EW_CONFIGS) for a in ARCHS},
    pointer_types=lambda d: {"X": TRITON_TYPE[d], "SCALE": "fp32", "SHIFT": "fp32", "R": TRITON_TYPE[d],
                             "RSCALE": "fp32", "Y": TRITON_TYPE[d]},
    floats=("lo",), div16=lambda v: ("C",), doc="act(x*scale+shift [+ r | + r*rscale])")

BN_BWD_REDUCE = KernelSpec(
    name="bn_act_bwd_reduce", module="resfuse.triton.bn_kernels", attr="bn_bwd_reduce_kernel", hot=True,
    dtypes=ELEMENTWISE_DTYPES,
    variants=_layouts([{"RELU": a, "HAS_RES": r} for a in (0, 1) for r in (0, 1)]),
    configs={a: list(_RED_CONFIGS) for a in ARCHS},
    pointer_types=lambda d: {"GO": TRITON_TYPE[d], "OUT": TRITON_TYPE[d], "X": TRITON_TYPE[d],
                             "MEAN": "fp32", "R": TRITON_TYPE[d], "RMEAN": "fp32", "PART": "fp32"},
    div16=lambda v: ("C",), doc="per-program partial sums of dz, dz*(x-mean), dz*(r-rmean)")

BN_BWD_APPLY = KernelSpec(
    name="bn_act_bwd_apply", module="resfuse.triton.bn_kernels", attr="bn_bwd_apply_kernel", hot=True,
    dtypes=ELEMENTWISE_DTYPES,
    variants=_layouts([{"RELU": a, "RES_GRAD": g} for a in (0, 1) for g in (0, 1, 2)]),
    configs={a: list(_EW_CONFIGS) for a in ARCHS},
    pointer_types=lambda d: {"GO": TRITON_TYPE[d], "OUT": TRITON_TYPE[d], "X": TRITON_TYPE[d],
                             "A": "fp32", "B": "fp32", "D": "fp32", "R": TRITON_TYPE[d], "RA": "fp32",
                             "RB": "fp32", "RD": "fp32", "GX": TRITON_TYPE[d], "GR": TRITON_TYPE[d]},
    div16=lambda v: ("C",), doc="grad_input = a*dz + b*x + d; grad_residual = dz | ra*dz + rb*r + rd")

# the end of a squeeze-and-excitation block (gate_kernels.py): reduction tiles per layout as above
GATE_ACT = KernelSpec(
    name="gate_act", module="resfuse.triton.gate_kernels", attr="gate_act_kernel", hot=True,
    dtypes=ELEMENTWISE_DTYPES, variants=_layouts([{"HAS_RES": r} for r in (0, 1)]),
    configs={a: list(_EW_CONFIGS) for a in ARCHS},
    pointer_types=lambda d: {"X": TRITON_TYPE[d], "GATE": "fp32", "R": TRITON_TYPE[d], "Y": TRITON_TYPE[d]},
    floats=("lo",), div16=lambda v: ("C",), doc="act(x*gate[n,c] [+ r])")

GATE_BWD = KernelSpec(
    name="gate_act_bwd", module="resfuse.triton.gate_kernels", attr="gate_bwd_kernel", hot=True,
    dtypes=ELEMENTWISE_DTYPES,
    variants=_layouts([{"RELU": a, "RES_GRAD": g, "GATE_GRAD": s} for a in (0, 1) for g in (0, 1) for s in (0, 1)]),
    configs={a: list(_RED_CONFIGS) for a in ARCHS},
    pointer_types=lambda d: {"GO": TRITON_TYPE[d], "OUT": TRITON_TYPE[d], "X": TRITON_TYPE[d], "GATE": "fp32",
                             "GX": TRITON_TYPE[d], "GR": TRITON_TYPE[d], "PART": "fp32"},
    div16=lambda v: ("C",), doc="gx = dz*gate[n,c]; gr = dz; per-program partial sums of dz*x per (n, c) (GATE_GRAD)")

KERNELS: dict[str, KernelSpec] = {k.name: k for k in (CONV, STATS_MERGE, BN_STATS, BN_ACT, BN_BWD_REDUCE,
                                                       BN_BWD_APPLY, GATE_ACT, GATE_BWD)}


# --------------------------------------------------------------------------------------------------
# Enumeration for the AOT tool
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One compilation: a kernel, one variant, one dtype, one config, one arch."""
    kernel: str
    variant: tuple[tuple[str, object], ...]
    dtype: str
    config: Config
    arch: int

    def hot(self, spec: "KernelSpec") -> bool:
        return spec.hot if self.config.hot is None else self.config.hot

    @property
    def variant_name(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.variant)
        return f"{self.dtype}|{self.config.name}" + (f"|{flags}" if flags else "")


def aot_units(kernels: Sequence[KernelSpec] | None = None, archs: Sequence[int] = ARCHS) -> list[Unit]:
    units = []
    for spec in (kernels if kernels is not None else KERNELS.values()):
        for arch in archs:
            for variant in spec.variants:
                for dtype in spec.dtypes:
                    for c in spec.configs_for(arch, variant, dtype):
                        units.append(Unit(spec.name, tuple(sorted(variant.items())), dtype, c, arch))
    return units


# --------------------------------------------------------------------------------------------------
# Deterministic choice of a config (the launchers call this)
# --------------------------------------------------------------------------------------------------
def arch_of(capability: tuple[int, int] | None) -> int:
    """The registry arch for a device capability: sm_9x -> 90, everything else (sm_80..sm_89, the
    interpreter) -> 80. Newer archs use the sm_90 table until they get their own."""
    if capability is None:
        return 80
    major = capability[0]
    return 90 if major >= 9 else 80


def pick_conv(arch: int, variant: dict, dtype: str, M: int, c_out: int, num_sms: int) -> Config:
    """Shape-keyed, deterministic. Wanted BLOCK_N: 64 for C_out <= 64, else 128. Preference:
    128 x wanted (when the grid has at least half as many tiles as SMs), then 64 x wanted, then the
    64-row config with the smallest BLOCK_N, then the first config."""
    cands = CONV.configs_for(arch, variant, dtype)
    if not cands:
        raise LookupError(f"no conv2d_fwd config for arch {arch}, dtype {dtype}, variant {variant}")
    if len(cands) == 1:
        return cands[0]
    want_n = 64 if c_out <= 64 else 128

    def find(bm, bn=None):
        return [c for c in cands if c["BLOCK_M"] == bm and (bn is None or c["BLOCK_N"] == bn)]

    big = find(128, want_n)
    if big and 2 * (-(-M // 128)) * (-(-c_out // want_n)) >= num_sms:
        return big[0]
    for group in (find(64, want_n), sorted(find(64), key=lambda c: c["BLOCK_N"])):
        if group:
            return group[0]
    return cands[0]


def pick(kernel: str, arch: int, variant: dict, dtype: str) -> Config:
    """The config of a non-GEMM kernel (one per variant and arch)."""
    cands = KERNELS[kernel].configs_for(arch, variant, dtype)
    if not cands:
        raise LookupError(f"no {kernel} config for arch {arch}, dtype {dtype}, variant {variant}")
    return cands[0]


def autotune_enabled() -> bool:
    """``RESFUSE_TRITON_AUTOTUNE=1``: time every registry config of a conv shape once on the GPU and keep
    the fastest (cached per shape for the process). Off by default: the heuristic is deterministic."""
    return os.environ.get("RESFUSE_TRITON_AUTOTUNE", "0") == "1"
