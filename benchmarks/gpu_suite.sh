#!/usr/bin/env bash
# The one call a GPU machine needs: install + build, the CUDA tests (the static report on the cubins just built
# runs beside them), the GEMM table, the DiT-XL/2 model table, the FLUX.1-dev model rows, a short report last.
# Fits in one device call (10 minutes, of which BUDGET = 570 s is planned): every stage has a time cap taken
# from what is left after reserving the later stages' minimum, in priority order (correctness first, then GEMMs,
# then DiT, then FLUX), and each benchmark gets a --max-seconds budget below its cap, writes its JSON after every
# case (the model benchmarks) and on SIGTERM marks what it did not reach as skipped.
#
# Stage plan on an H200 (16 cores), default DITQ_SUITE_PART=all, seconds as capped / as expected:
#   wheels          60 cap /   5     carried wheels (diffusers) into a fresh --target folder
#   install        240 cap / 150?    pip install -e . (the CUDA extension for this GPU's architecture only; the
#                                    longest unit, gemm_sm90.cu, takes ~140 s of nvcc on one core), or ~10 s with
#                                    a carried .prebuilt/ built from these sources for this torch and GPU
#                                    (benchmarks/prebuild_extension.sh; carry=[".whl", ".prebuilt"])
#   pytest-cuda    150 cap /  80?    the `cuda` tests (real CUDA and Triton kernels at the shipped tiles vs the
#                                    integer references and the emulator) and the `gpu` ones (CPU tests that run
#                                    their kernels on the GPU when there is one), over 4 processes
#                                    (DITQ_SUITE_PYTEST_WORKERS); tests not started 20 s before the cap skip as
#                                    "out of time" (tests/conftest.py); static_report runs beside it
#                                    (own cap 150 s; waited for before the model stages, whose eager timings
#                                    a busy CPU would distort)
#   sanitize        90 cap           only if GPU tests failed: the first 3 again under compute-sanitizer memcheck
#   bench-gemm     110 cap           DiT-XL/2 + FLUX.1 attention / MLP shapes, M 16 / 4096 / 64 / 16384 / 512
#                                    in that order, W8A8, W4A8 g64 / g128, bf16, _int_mm, fp8 row-wise
#   bench-model    150 cap           DiT-XL/2 256 px, batch 1 and 8, all precisions eager + CUDA graph, then
#                                    compiles at batch 8 while the budget allows (bf16 and fp8 row-wise first)
#   bench-flux     rest (~100-150)   FLUX.1-dev 1024^2 batch 1: bf16, fp8 row-wise, ditq W8A8 / W4A8 fused,
#                                    eager + CUDA graph; a compile starts only if ~150 s are left (--compile-estimate)
#   summary          5               record_gpu_run.py --summary: targets and short tables from the JSON
# A second call on a fresh machine (it reinstalls and rebuilds) can measure what the first had no time for:
#   DITQ_SUITE_PART=models bash benchmarks/gpu_suite.sh   # no tests / static / GEMMs: DiT and FLUX, compiles
#   DITQ_SUITE_PART=flux   bash benchmarks/gpu_suite.sh   # FLUX.1-dev only, compiles included
#   DITQ_SUITE_PART=tune   bash benchmarks/gpu_suite.sh   # tile tuning: benchmarks/tune_tiles.py times every
#                                    shipped tile and its neighbours at model shapes and writes the measured Triton
#                                    tables (under $OUT/configs/, copy them to kernels/configs/) and proposed CUDA
#                                    tile rules (gemm_tile_rules.h.txt, applied by hand: they need a rebuild)
#
#   bash benchmarks/gpu_suite.sh            # results under $OUT if set, else benchmarks/out/
#   DITQ_SUITE_SKIP_INSTALL=1 bash benchmarks/gpu_suite.sh   # dry run on a CPU machine (benchmarks fall back
#                                                            # to --smoke, the cuda tests skip)
# Then, on the machine the files came back to: python benchmarks/record_gpu_run.py FOLDER (writes RESULTS.md).
#
# Packages the machine lacks travel as wheels in .whl/ at the repo root (installed with --no-deps into a
# fresh /tmp/ditq_site.* put on PYTHONPATH). The model benchmarks need diffusers, a pure-Python wheel (the GPU
# image has its dependencies); torchao gives the GEMM and model tables torchao's own int8 / fp8 row-wise rows
# (0.17.0 imports and quantizes with the image's torch 2.11: checked on a CPU venv of torch 2.11 + triton 3.6).
# The extension can be compiled on the CPU too, against the image's Python 3.12 and torch 2.11, so the GPU's
# minutes are not spent in nvcc (.prebuilt/; the suite checks it matches, else builds). One command makes both:
#   bash benchmarks/prepare_gpu_run.sh        # -> .whl/ (diffusers, torchao) and .prebuilt/ (~4 min)
# .whl/ and .prebuilt/ are git-ignored, so the device tool carries them only when asked:
# carry=[".whl", ".prebuilt"].
# With $OUT set, only these files come back: summary.md, gpu_suite.log, pytest_cuda.xml (the cuda tests' JUnit
# report), the JSON files, the GEMM plot, the tuning report (tune part) and gpu_suite_results.tar.gz (everything:
# markdown tables, model plots, stages.txt, the rewritten configs/).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
BUDGET=${DITQ_SUITE_SECONDS:-570}  # 10 minutes less a margin for the copy-out
PART=${DITQ_SUITE_PART:-all}
case "$PART" in all|models|flux|tune) ;; *) echo "DITQ_SUITE_PART must be all, models, flux or tune (got '$PART')" >&2; exit 2;; esac
START=$(date +%s)
if [ -n "${OUT:-}" ]; then WORK=$(mktemp -d /tmp/ditq_suite.XXXXXX); else WORK="$REPO/benchmarks/out"; fi
mkdir -p "$WORK"
LOG="$WORK/gpu_suite.log"
STATUS="$WORK/stages.txt"
: >"$STATUS"
: >"$LOG"

left() { echo $((BUDGET - ($(date +%s) - START))); }
cap() {  # cap SECONDS RESERVE: at most SECONDS, leaving RESERVE seconds for the stages after this one
  local l=$(($(left) - $2)); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 10 ] && l=10; echo "$l"
}
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log everything, record the outcome
  local name=$1 limit=$2 t0 rc; shift 2
  t0=$(date +%s)
  echo -e "\n===== $name (limit ${limit}s, $(left)s left) =====" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  printf '%-14s rc=%-4s %4ss\n' "$name" "$rc" "$(($(date +%s) - t0))" | tee -a "$STATUS"
  return "$rc"
}

{ date -u; echo "DITQ_SUITE_PART=$PART, budget ${BUDGET}s";
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log -1 --oneline 2>/dev/null; } 2>&1 | tee -a "$LOG"

# 1. carried wheels, then ditq itself (the extension builds for this GPU's architecture only: short compile)
if ls .whl/*.whl >/dev/null 2>&1 && [ "${DITQ_SUITE_SKIP_INSTALL:-0}" != 1 ]; then
  SITE=$(mktemp -d /tmp/ditq_site.XXXXXX)
  stage wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
ARCH=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))" 2>/dev/null)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0a}}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
prebuilt() {  # use .prebuilt/ (benchmarks/prebuild_extension.sh) when it is this tree's, torch's and GPU's build
  local suffix so want
  [ -f .prebuilt/BUILD_INFO ] || { echo "no .prebuilt/: building here"; return 1; }
  suffix=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  so=.prebuilt/_C$suffix
  [ -f "$so" ] || { echo "prebuilt: no _C$suffix for this Python: building here"; return 1; }
  want="sources $(bash benchmarks/source_hash.sh)
torch $(python3 -c 'import torch; print(torch.__version__)')
archs $TORCH_CUDA_ARCH_LIST"
  if [ "$(head -3 .prebuilt/BUILD_INFO)" != "$want" ]; then
    echo "prebuilt: built for other sources / torch / archs, building here. It has:"; cat .prebuilt/BUILD_INFO
    echo "here:"; echo "$want"; return 1
  fi
  cp "$so" ditq/ && DITQ_NO_EXTENSION=1 python3 -m pip install -q --no-deps --no-build-isolation -e . \
    && python3 -c "from ditq import backends; why = backends.unavailable_reason('cuda', 'cuda'); print('prebuilt ditq._C loads; cuda backend:', why or 'available'); raise SystemExit(why is not None)" \
    && return 0
  echo "prebuilt: did not load or install: building here"; rm -f "ditq/_C$suffix"; return 1
}
if [ "${DITQ_SUITE_SKIP_INSTALL:-0}" = 1 ]; then
  echo "DITQ_SUITE_SKIP_INSTALL=1: using the ditq already installed" | tee -a "$LOG"
elif T0=$(date +%s) && prebuilt 2>&1 | tee -a "$LOG" && [ "${PIPESTATUS[0]}" = 0 ]; then
  printf '%-14s rc=%-4s %4ss\n' install-prebuilt 0 "$(($(date +%s) - T0))" | tee -a "$STATUS"
elif ! stage install "$(cap 240 300)" python3 -m pip install --no-deps --no-build-isolation -e .; then
  # Keep going without the CUDA extension: the Triton kernels and the baselines still run.
  DITQ_NO_EXTENSION=1 stage install-noext 60 python3 -m pip install -q --no-deps --no-build-isolation -e .
fi

STATIC_PID=
if [ "$PART" = all ]; then
  # 2. the real kernels against the integer references; what the cubins just built look like (CPU work, beside
  #    the tests: neither is timed)
  ( timeout --signal=TERM --kill-after=10 150 python3 benchmarks/static_report.py --short --out "$WORK" \
      >"$WORK/static.log" 2>&1; rc=$?
    printf '%-14s rc=%-4s (beside pytest-cuda)\n' static "$rc" >>"$STATUS" ) &
  STATIC_PID=$!
  # the tests compare each real kernel with the emulator, CPU-bound work: spread over a few processes (the image
  # has pytest-xdist; the kernels themselves are small, so the processes share the GPU without waiting on it)
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${DITQ_SUITE_PYTEST_WORKERS:-4}")
  # a kernel that never finishes (an mbarrier wait on the wrong phase) would hold its test, and the GPU, until the
  # cap kills pytest: the image's pytest-timeout ends that one process instead (thread method: it works while
  # the test waits inside a CUDA call), xdist reports the test as crashed and carries on with a new worker
  TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && [ -n "$XDIST" ] \
    && echo "--timeout=${DITQ_SUITE_TEST_TIMEOUT:-90} --timeout-method=thread")
  # a deadline 20 s before the cap: tests not started by then skip ("out of time", tests/conftest.py), so pytest
  # still prints its failures and writes the JUnit XML (a SIGTERM at the cap gets the same report, if late)
  T=$(cap 150 280)
  DITQ_TEST_DEADLINE=$(($(date +%s) + T - 20)) stage pytest-cuda "$T" python3 -m pytest -m "cuda or gpu" -q \
    -p no:cacheprovider $XDIST $TIMEOUT tests --junitxml="$WORK/pytest_cuda.xml"
  # Only when tests failed: the first few again under compute-sanitizer's memcheck (out-of-bounds and misaligned
  # accesses the emulator did not model), whose report names the kernel and the address; the timings after
  # matter less than why a kernel is wrong.
  mapfile -t FAILED < <(python3 benchmarks/record_gpu_run.py "$WORK" --failed 3)  # node ids: no globbing
  if [ "${#FAILED[@]}" -gt 0 ] && command -v compute-sanitizer >/dev/null; then
    stage sanitize "$(cap 90 190)" compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q \
      -p no:cacheprovider -x "${FAILED[@]}"
  fi

  # 3. GEMMs: DiT-XL/2 and FLUX.1 shapes, the targets' M first; writes its JSON before its cap
  T=$(cap 110 190); stage bench-gemm "$T" python3 benchmarks/bench_gemm.py --quick --max-seconds $((T - 20)) \
    --out "$WORK"
fi
if [ -n "$STATIC_PID" ]; then  # the model stages time eager steps: no compiler may share the CPU with them
  wait "$STATIC_PID"; echo "===== static (beside pytest-cuda) =====" >>"$LOG"; cat "$WORK/static.log" >>"$LOG"
fi

# 4. the DiT-XL/2 model table; 5. FLUX.1-dev rows (each writes its JSON after every case and on SIGTERM)
DIT_PREC="bf16 fp8-rowwise w8a8-fused w8a8 w4a8-fused w4a8"  # compile order under a budget: the targets' first
FLUX_PREC="bf16 fp8-rowwise w8a8-fused w4a8-fused"
# the models call has the time for what a run-time LoRA adapter costs a step (beside w8a8-fused) and what integer
# group scales buy W4A8 (beside w4a8-fused), cut first; the flux call adds the latter to FLUX
if [ "$PART" = models ]; then DIT_PREC="$DIT_PREC w4a8i-fused w8a8-fused-lora"; fi
if [ "$PART" = models ] || [ "$PART" = flux ]; then FLUX_PREC="$FLUX_PREC w4a8i-fused"; fi
if [ "$PART" = all ] || [ "$PART" = models ]; then
  if [ "$PART" = all ]; then T=$(cap 150 100); else T=$(cap 260 200); fi
  stage bench-model "$T" python3 benchmarks/bench_model.py --resolutions 256 --batches 1 8 --compile-batches 8 \
    --precisions $DIT_PREC --max-seconds $((T - 25)) --out "$WORK"
fi
if [ "$PART" != tune ]; then
  T=$(cap 600 10)
  stage bench-flux "$T" python3 benchmarks/bench_model.py --model flux --precisions $FLUX_PREC \
    --max-seconds $((T - 25)) --out "$WORK"
else
  # tile tuning on copies of the Triton tables (nothing else in this call reads them); the shipped
  # configurations are timed first, so a cut-short run still compares shipped and best
  cp -r kernels/configs "$WORK/configs"
  T=$(cap 600 10)
  stage tune-tiles "$T" python3 benchmarks/tune_tiles.py --write-configs --configs-dir "$WORK/configs" \
    --max-seconds $((T - 30)) --out "$WORK"
fi

# 6. the short report, last (targets and tables from the JSON: the same text record_gpu_run.py puts in RESULTS.md)
python3 benchmarks/record_gpu_run.py --summary "$WORK" 2>&1 | tee "$WORK/summary.md"

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_suite_results.tar.gz" -C "$WORK" . 2>/dev/null
  for f in summary.md gpu_suite.log pytest_cuda.xml gemm.json model.json model_flux.json static_report.json gemm_speedup.png \
           tiles.json tiles.md gemm_tile_rules.h.txt; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
  done
  echo "results: $OUT (everything in gpu_suite_results.tar.gz)"
else
  echo "results: $WORK"
fi
echo "suite took $(($(date +%s) - START))s"
