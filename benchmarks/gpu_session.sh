#!/usr/bin/env bash
# One prepared GPU session (about 9 minutes): build resfuse with its CUDA kernels, run the GPU tests,
# resfuse.fuse on the real torchvision / timm ResNets against plain PyTorch, compute-sanitizer over the
# CUDA kernels' tests, the GPU benchmarks and a fused-conv timing table.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh      # on the GPU machine, from the repository root
#
# Every step runs under `timeout` within an overall budget (SESSION_BUDGET seconds, default 540) and
# the session goes on after a failed or timed-out step (except a failed build). Results in $OUT, at
# most 8 files (what the device tool brings back), each stamped with device, driver, torch / triton /
# CUDA versions, git commit and date:
#   session.json           stamp + every step's command, exit code, seconds and summary line, and the
#                          GPU test steps' counts and failures (from pytest's JUnit XML)
#   build.log              pip install output
#   gpu_tests.log          the CUDA backend's tests, the fuse_compat step, every other gpu-marked test
#   fuse_compat.json       benchmarks/fuse_compat.py: resfuse.fuse on torchvision resnet18/50, resnext50,
#                          wide_resnet50_2 and timm resnet18/50, backends cuda then triton: fused and plain
#                          fp32 / bf16-autocast errors against float64 per model (for benchmarks/results/)
#   sanitizer.log          compute-sanitizer memcheck, racecheck (shared memory) and initcheck
#   bench.log/.json        pytest benchmarks/ -k gpu (pytest-benchmark JSON + the stamp)
#   cuda_conv_timing.json  fused CUDA conv vs cuDNN conv (+ the separate BN passes it replaces)
#
# Environment: PYTHON (default python), SESSION_BUDGET, GIT_COMMIT (when .git is not on the machine),
# TORCH_CUDA_ARCH_LIST (default 9.0: build for the H200 only, half the compile time), MAX_JOBS.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the results folder}"
PYTHON="${PYTHON:-python}"
BUDGET="${SESSION_BUDGET:-540}"
START=$(date +%s)
mkdir -p "$OUT"
SCRATCH="$(mktemp -d)"  # tests run from here, so `import resfuse` is the installed package, not ./resfuse
STEPS="$SCRATCH/steps.tsv"
: >"$STEPS"
export PYTHONUNBUFFERED=1 RESFUSE_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# ---- stamp ------------------------------------------------------------------------------------------
COMMIT="${GIT_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
DIRTY="$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l | tr -d ' ')"
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
stamp_json() {
  (cd "$SCRATCH" && "$PYTHON" - "$COMMIT" "$DIRTY" "$SANITIZER" <<'EOF'
import datetime, json, platform, subprocess, sys
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__})"
s = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
     "git_commit": sys.argv[1], "git_dirty_files": sys.argv[2], "python": platform.python_version(),
     "host": platform.node()}
s["gpu"] = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader")
s["nvcc"] = run("nvcc", "--version").splitlines()[-1:] or ["unavailable"]
s["compute_sanitizer"] = run(sys.argv[3], "--version").splitlines()[-1:] if sys.argv[3] else "not found"
try:
    import torch
    s["torch"], s["torch_cuda"] = torch.__version__, torch.version.cuda
    s["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        s["device"] = f"{p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.0f} GiB"
except Exception as e:  # noqa: BLE001
    s["torch"] = f"import failed: {e}"
try:
    import triton
    s["triton"] = triton.__version__
except Exception:  # noqa: BLE001
    s["triton"] = "not installed"
try:
    import resfuse
    from resfuse import _extension
    s["resfuse"] = {"file": resfuse.__file__, "extension_loaded": _extension.LOADED,
                    "cuda_kernels": _extension.has_cuda_kernels(), "error": _extension.ERROR}
except Exception as e:  # noqa: BLE001
    s["resfuse"] = f"import failed: {e}"
print(json.dumps(s))
EOF
  )
}
STAMP="$(stamp_json)"
echo "stamp: $STAMP"

# ---- steps ------------------------------------------------------------------------------------------
# step NAME MAX_SECONDS LOG CMD...: runs CMD under timeout (the smaller of MAX_SECONDS and what is left
# of the budget), appends to LOG (stamped once at its top) and records the result.
step() {
  local name="$1" max="$2" log="$3"
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  local t=$(( max < left ? max : left ))
  [ -s "$log" ] || echo "# $STAMP" >"$log"
  if [ "$t" -lt 15 ]; then
    printf '%s\tskipped\t0\t%s\tno time left in the session budget\n' "$name" "$(echo "$*" | cut -c1-300)" >>"$STEPS"
    echo "== $name: skipped (budget spent)" | tee -a "$log"
    return 0
  fi
  echo "== $name (timeout ${t}s): $*" | tee -a "$log"
  local t0=$(date +%s) rc
  (cd "$SCRATCH" && timeout --kill-after=10 "$t" "$@") >>"$log" 2>&1
  rc=$?
  local summary
  summary="$(grep -v -e '^# {' -e '^== ' "$log" | grep -E '(passed|failed|error|skipped|no tests ran|ERROR SUMMARY)' | tail -1 | cut -c1-300)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && summary="TIMEOUT after ${t}s; $summary"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$(echo "$*" | cut -c1-300)" "$summary" >>"$STEPS"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$log"
  return $rc
}

finish() {
  (cd "$SCRATCH" && "$PYTHON" - "$STEPS" "$OUT" "$STAMP" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
steps_file, out, stamp, total = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
steps = []
for line in open(steps_file):
    name, rc, secs, cmd, summary = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
    steps.append({"step": name, "rc": rc, "seconds": int(secs or 0), "command": cmd, "summary": summary})
# JUnit XML of the GPU test steps -> counts per step and the failures' messages
report = {}
for step_name, xml in (("cuda_tests", ".junit_cuda.xml"), ("other_gpu_tests", ".junit_other.xml")):
    try:
        root = ET.parse(f"{out}/{xml}").getroot()
    except Exception:  # the step did not run, or was killed before pytest wrote its report
        report[step_name] = "no JUnit report (step skipped or timed out): see gpu_tests.log"
        continue
    counts, failures = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, []
    for suite in root.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                 "message": (el.get("message") or "")[:500]})
    report[step_name] = {"counts": counts, "failures": failures[:300]}
json.dump({"stamp": stamp, "total_seconds": total, "steps": steps, "tests": report}, open(f"{out}/session.json", "w"),
          indent=1)
# pytest-benchmark JSON: add the stamp
try:
    b = json.load(open(f"{out}/bench.json"))
    b["resfuse_stamp"] = stamp
    json.dump(b, open(f"{out}/bench.json", "w"))
except Exception:
    pass
EOF
  )
  rm -f "$OUT"/.junit_*.xml "$OUT"/*.tmp  # *.tmp: fuse_compat.py's half-written JSON, if it was killed mid-write
  rm -rf "$SCRATCH"
  echo "gpu_session: done in $(( $(date +%s) - START ))s; results in $OUT"
}
trap finish EXIT

# 1. build (everything else needs it)
step build 220 "$OUT/build.log" "$PYTHON" -m pip install --no-build-isolation --no-deps -v "$REPO" || exit 1
STAMP="$(stamp_json)"  # now with resfuse's build status
step check_build 30 "$OUT/build.log" "$PYTHON" -c \
  "from resfuse import _extension as e; assert e.has_cuda_kernels(), e.ERROR or 'built without CUDA kernels'" || exit 1

# 2. the CUDA backend's tests first (they are quick and say whether the kernels are right)
CUDA_TESTS=("$REPO/tests/test_cuda_ops.py" "$REPO/tests/test_cuda_backend.py")
step cuda_tests 120 "$OUT/gpu_tests.log" "$PYTHON" -m pytest "${CUDA_TESTS[@]}" -q --tb=line -p no:cacheprovider \
  --junitxml="$OUT/.junit_cuda.xml"

# 3. resfuse.fuse on the real torchvision / timm ResNets (issue 7): eval and a train step, fused and plain
#    PyTorch each against float64 (TF32 off), every model on the cuda backend, then on triton (its kernels
#    compile on first use); the JSON is rewritten after each model, so a timeout keeps what finished
step fuse_compat 90 "$OUT/gpu_tests.log" "$PYTHON" "$REPO/benchmarks/fuse_compat.py" --out "$OUT/fuse_compat.json" \
  --stamp "$STAMP"

# 4. fused CUDA conv vs cuDNN (+ the BN passes it replaces), ResNet-50 shapes, bfloat16 channels_last
step conv_timing 50 "$OUT/bench.log" "$PYTHON" - "$OUT/cuda_conv_timing.json" "$STAMP" <<'EOF'
import json, sys
import torch
import torch.nn.functional as F
import resfuse  # noqa: F401  (loads torch.ops.resfuse)

ops = torch.ops.resfuse
torch.backends.cudnn.benchmark = True

def ms(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]

rows = []
N = 32
for name, (cin, cout, hw, k, s) in {
        "res2_3x3": (64, 64, 56, 3, 1), "res2_1x1_expand": (64, 256, 56, 1, 1),
        "res3_3x3": (128, 128, 28, 3, 1), "res4_1x1_expand": (256, 1024, 14, 1, 1),
        "res5_3x3": (512, 512, 7, 3, 1), "res3_1x1_s2_proj": (256, 512, 56, 1, 2)}.items():
    x = torch.randn(N, cin, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last)
    p = k // 2
    bias = torch.randn(cout, device="cuda")
    y = F.conv2d(x, w, None, s, p)
    res = torch.randn_like(y)
    one = torch.ones(cout, device="cuda")
    flop = 2 * y.numel() * cin * k * k
    t = {
        "cudnn_conv": ms(lambda: F.conv2d(x, w, None, s, p)),
        "cudnn_conv+bn_stats": ms(lambda: ops.bn_stats(F.conv2d(x, w, None, s, p))),
        "fused_conv_stats": ms(lambda: ops.cuda_conv_stats(x, w, [s, s], [p, p], [1, 1])),
        "cudnn_conv+bn_act(bias,res,relu)": ms(lambda: ops.bn_act(F.conv2d(x, w, None, s, p), one, bias, res, None, True)),
        "fused_conv_bias_act(bias,res,relu)": ms(lambda: ops.cuda_conv_bias_act(x, w, None, bias, [s, s], [p, p], [1, 1], res, True)),
    }
    row = {"layer": name, "N": N, "cin": cin, "cout": cout, "hw": hw, "k": k, "stride": s, "dtype": "bfloat16",
           "ms": t, "tflops": {k2: flop / v / 1e9 for k2, v in t.items()}}
    rows.append(row)
    print(name, {k2: round(v, 4) for k2, v in t.items()})
json.dump({"stamp": json.loads(sys.argv[2]), "rows": rows}, open(sys.argv[1], "w"), indent=1)
EOF

# 5. compute-sanitizer: memcheck over the CUDA kernel tests (16-bit mma + float32 SIMT paths, both
#    layouts; without the caching allocator, so out-of-bounds accesses hit real allocation ends),
#    racecheck (shared-memory hazards of the conv pipeline and the block reductions) and initcheck
#    (reads of uninitialised global memory, e.g. workspaces) on small subsets.
if [ -n "$SANITIZER" ]; then
  # only resfuse's kernels are instrumented (torch's and cuDNN's run as usual); torch's benign CUDA API
  # errors (probing) are not reported
  SAN=("$SANITIZER" --error-exitcode 86 --print-limit 20 --report-api-errors no --kernel-name kns=resfuse)
  PYT=("$PYTHON" -m pytest "$REPO/tests/test_cuda_ops.py" -q --tb=line -p no:cacheprovider)
  step memcheck 100 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN[@]}" --tool memcheck \
    "${PYT[@]}" -k "not large and not poison and (bfloat16 or float32)"
  step racecheck 50 "$OUT/sanitizer.log" "${SAN[@]}" --tool racecheck \
    "${PYT[@]}" -k "(conv_bias_act and 3x3-k24 and bias-relu) or (conv_stats and (1x1s2 or stem)) or (bn_stats and nhwc and 40)"
  step initcheck 35 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN[@]}" --tool initcheck \
    "${PYT[@]}" -k "not large and not poison and bfloat16 and (conv_stats or bn_stats or backward_reduce) and nhwc"
else
  printf 'sanitizer\t127\t0\tcompute-sanitizer\tcompute-sanitizer not found on PATH or in /usr/local/cuda/bin\n' >>"$STEPS"
fi

# 6. every other gpu-marked test (Triton kernels, models, ...)
step other_gpu_tests 90 "$OUT/gpu_tests.log" "$PYTHON" -m pytest "$REPO/tests" -m gpu -q --tb=line -p no:cacheprovider \
  --ignore="${CUDA_TESTS[0]}" --ignore="${CUDA_TESTS[1]}" --junitxml="$OUT/.junit_other.xml"

# 7. benchmarks marked/named gpu
step bench 45 "$OUT/bench.log" "$PYTHON" -m pytest "$REPO/benchmarks" -k gpu -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json"

exit 0
