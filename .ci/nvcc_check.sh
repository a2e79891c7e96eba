#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc, without torch headers, for sm_80 and sm_90a, and
# print ptxas' resource usage per kernel (registers, static shared memory, stack, spills).
#
# Fails when a file does not compile, nvcc warns, or a kernel spills registers to local memory.
# Then, when torch is importable (a CPU build is enough), the torch bindings csrc/cuda/*.cpp are
# compiled syntax-only with g++ against torch's headers; the CUDA-library headers a CPU wheel's
# environment lacks (cuBLAS, cuSPARSE, cuSOLVER; c10's cuda_cmake_macros.h) are stubbed with the few
# handle typedefs that ATen/cuda/CUDAContextLight.h declares.
# The .cu files are pure CUDA (raw pointers + cudaStream_t launchers); torch's own nvcc defines
# (no implicit half/bfloat16 conversions) and C++ standard are mirrored so that what compiles here
# compiles in `pip install .`. Needs no GPU.
#
#   .ci/nvcc_check.sh                 # logs in build/nvcc_check (or $NVCC_CHECK_OUT)
#   NVCC_CHECK_JOBS=4 .ci/nvcc_check.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
JOBS="${NVCC_CHECK_JOBS:-2}"
OUT="${NVCC_CHECK_OUT:-$ROOT/build/nvcc_check}"
mkdir -p "$OUT"

command -v "$NVCC" >/dev/null || { echo "nvcc_check: $NVCC not found" >&2; exit 2; }
mapfile -t SOURCES < <(cd "$ROOT" && ls csrc/cuda/*.cu)
[ "${#SOURCES[@]}" -gt 0 ] || { echo "nvcc_check: no csrc/cuda/*.cu" >&2; exit 2; }

# The kernels must not see torch: no torch include path is given, and no .cu/.cuh they include may
# name torch headers (csrc/cuda/bindings.cuh is the bindings' host-only header, never included by a .cu).
if grep -nE '#include *[<"](torch|ATen|c10)/' "$ROOT"/csrc/cuda/*.cu; then
  echo "nvcc_check: a .cu file includes torch headers" >&2; exit 1
fi
if grep -nE '#include *"bindings.cuh"' "$ROOT"/csrc/cuda/*.cu; then
  echo "nvcc_check: a .cu file includes bindings.cuh (torch headers)" >&2; exit 1
fi

FLAGS=(-std=c++20 -O3 -lineinfo --expt-relaxed-constexpr -Werror all-warnings -Xptxas -v
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
declare -A GENCODE=([sm_80]="arch=compute_80,code=sm_80" [sm_90a]="arch=compute_90a,code=sm_90a")

compile() {  # $1 = source, $2 = arch tag
  local src="$1" arch="$2" stem log
  stem="$(basename "$src" .cu)"
  log="$OUT/$stem.$arch.log"
  if (cd "$ROOT" && "$NVCC" "${FLAGS[@]}" -gencode "${GENCODE[$arch]}" -c "$src" -o "$OUT/$stem.$arch.o") >"$log" 2>&1; then
    echo "ok    $src $arch"
  else
    echo "FAIL  $src $arch (log: $log)"; sed -n '1,40p' "$log"; return 1
  fi
}
export ROOT NVCC OUT

start=$(date +%s)
status=0
for src in "${SOURCES[@]}"; do for arch in sm_80 sm_90a; do echo "$src $arch"; done; done |
  xargs -P "$JOBS" -n 2 bash -c "$(declare -p FLAGS GENCODE); $(declare -f compile); compile \"\$0\" \"\$1\"" || status=1
echo "nvcc_check: compiled ${#SOURCES[@]} files x 2 archs in $(( $(date +%s) - start )) s with $JOBS jobs"

# ptxas: "Compiling entry function '<mangled>' for 'sm_XX'", then stack/spill and register/smem lines.
summary="$OUT/ptxas_summary.txt"
: >"$summary"
for log in "$OUT"/*.log; do
  [ -s "$log" ] || continue
  awk -v file="$(basename "$log" .log)" '
    /Compiling entry function/ { q = index($0, "'"'"'"); rest = substr($0, q + 1); fn = substr(rest, 1, index(rest, "'"'"'") - 1); next }
    /bytes stack frame/ { line = $0; gsub(/[^0-9]+/, " ", line); split(line, v, " "); stack = v[1]; st = v[2]; ld = v[3]; next }
    /Used [0-9]+ registers/ {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
      if (fn != "") printf "%s\t%s\tregs=%s\tsmem=%s\tstack=%s\tspill_st=%s\tspill_ld=%s\n", file, fn, regs, smem, stack, st, ld
      fn = ""
    }
  ' "$log" >>"$summary"
done
if command -v c++filt >/dev/null; then
  c++filt <"$summary" | sed -E 's/resfuse::cuda::\(anonymous namespace\):://g; s/resfuse::cuda:://g' >"$summary.tmp" && mv "$summary.tmp" "$summary"
fi
sort -o "$summary" "$summary"
cat "$summary"
spills=$(awk -F'\t' '{ split($6, s, "="); split($7, l, "="); if (s[2] + 0 > 0 || l[2] + 0 > 0) n++ } END { print n + 0 }' "$summary")
echo "nvcc_check: $(wc -l <"$summary") kernels, $spills with register spills; summary in $summary"
if [ "$spills" -gt 0 ]; then
  echo "nvcc_check: FAIL: kernels spill registers:" >&2
  awk -F'\t' '{ split($6, s, "="); split($7, l, "="); if (s[2] + 0 > 0 || l[2] + 0 > 0) print }' "$summary" >&2
  status=1
fi

# ---- bindings: syntax-only against torch's headers ------------------------------------------------
PYTHON="${PYTHON:-python3}"
CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
if TORCH_INC="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"; then
  STUBS="$OUT/stubs"
  mkdir -p "$STUBS/c10/cuda/impl"
  first_inc="${TORCH_INC%% *}"
  [ -f "$first_inc/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#pragma once' >"$STUBS/c10/cuda/impl/cuda_cmake_macros.h"
  stub() {  # $1 = header, rest = typedef lines
    local h="$1"; shift
    [ -f "$CUDA_INC/$h" ] && return
    { echo "#pragma once  // nvcc_check stub"; printf '%s\n' "$@"; } >"$STUBS/$h"
  }
  stub cusparse.h "typedef struct cusparseContext* cusparseHandle_t;"
  stub cublas_v2.h "typedef struct cublasContext* cublasHandle_t;"
  stub cublasLt.h "typedef struct cublasLtContext* cublasLtHandle_t;"
  stub cusolverDn.h "typedef struct cusolverDnContext* cusolverDnHandle_t;"
  INCS=(-I"$STUBS" -I"$CUDA_INC")
  for d in $TORCH_INC; do INCS+=(-isystem "$d"); done
  PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  syntax() {  # $1 = source
    local log="$OUT/$(basename "$1" .cpp).syntax.txt"
    if g++ -std=c++20 -fsyntax-only -Wall -Wextra -Werror -I"$PY_INC" "${INCS[@]}" "$1" >"$log" 2>&1; then
      echo "ok    ${1#"$ROOT"/} (g++ -fsyntax-only, torch headers)"
    else
      echo "FAIL  ${1#"$ROOT"/} (log: $log)"; sed -n '1,30p' "$log"; return 1
    fi
  }
  start=$(date +%s)
  printf '%s\n' "$ROOT"/csrc/cuda/*.cpp |
    xargs -P "$JOBS" -n 1 bash -c "$(declare -p INCS PY_INC ROOT OUT); $(declare -f syntax); syntax \"\$0\"" || status=1
  echo "nvcc_check: bindings syntax-checked in $(( $(date +%s) - start )) s"
else
  echo "nvcc_check: torch not importable with $PYTHON: bindings not syntax-checked"
fi
exit $status
