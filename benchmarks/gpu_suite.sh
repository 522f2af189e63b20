#!/usr/bin/env bash
# The one call a GPU machine needs: install + build, the CUDA tests, the static report on the cubins
# just built, both GPU benchmarks, a short table last. Fits in 10 minutes: every stage has a time cap taken from
# what is left, and the benchmarks get a --max-seconds budget so they write their JSON before the cap.
#
#   bash benchmarks/gpu_suite.sh            # results under $OUT if set, else benchmarks/out/
#   DITQ_SUITE_SKIP_INSTALL=1 bash benchmarks/gpu_suite.sh   # dry run on a CPU machine (benchmarks fall back
#                                                            # to --smoke, the cuda tests skip)
#
# Packages the machine lacks travel as wheels in .whl/ at the repo root (installed with --no-deps into a
# fresh /tmp/ditq_site.* put on PYTHONPATH). The DiT model benchmark needs diffusers, a pure-Python wheel (the GPU image has its dependencies):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# .whl/ is git-ignored (.git/info/exclude), so the device tool carries it only when asked: carry=[".whl"].
# With $OUT set, only 8 files come back: summary.md, gpu_suite.log, the three JSON files, the two plots and
# gpu_suite_results.tar.gz (everything, markdown tables and JUnit XML included).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
BUDGET=${DITQ_SUITE_SECONDS:-570}  # 10 minutes less a margin for the copy-out
START=$(date +%s)
if [ -n "${OUT:-}" ]; then WORK=$(mktemp -d /tmp/ditq_suite.XXXXXX); else WORK="$REPO/benchmarks/out"; fi
mkdir -p "$WORK"
LOG="$WORK/gpu_suite.log"
STATUS="$WORK/stages.txt"
: >"$STATUS"

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

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log -1 --oneline 2>/dev/null; } 2>&1 | tee -a "$LOG"

# 1. carried wheels, then ditq itself (the extension builds for this GPU's architecture only: short compile)
if ls .whl/*.whl >/dev/null 2>&1 && [ "${DITQ_SUITE_SKIP_INSTALL:-0}" != 1 ]; then
  SITE=$(mktemp -d /tmp/ditq_site.XXXXXX)
  stage wheels 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
ARCH=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))" 2>/dev/null)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0a}}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ "${DITQ_SUITE_SKIP_INSTALL:-0}" = 1 ]; then
  echo "DITQ_SUITE_SKIP_INSTALL=1: using the ditq already installed" | tee -a "$LOG"
elif ! stage install "$(cap 240 330)" python3 -m pip install --no-deps --no-build-isolation -e .; then
  # Keep going without the CUDA extension: the Triton kernels and the baselines still run.
  DITQ_NO_EXTENSION=1 stage install-noext 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
fi

# 2. the real kernels against the integer references
stage pytest-cuda "$(cap 150 250)" python3 -m pytest -m cuda -q -p no:cacheprovider tests \
  --junitxml="$WORK/pytest_cuda.xml"

# 3. what the cubins just built look like (CPU work; sm_90 only, as built)
stage static "$(cap 60 210)" python3 benchmarks/static_report.py --short --out "$WORK"

# 4. GEMMs (DiT-XL/2 shapes), then the model; each writes its JSON before its cap
T=$(cap 150 110); stage bench-gemm "$T" python3 benchmarks/bench_gemm.py --quick --max-seconds $((T - 25)) --out "$WORK"
T=$(cap 400 5); stage bench-model "$T" python3 benchmarks/bench_model.py --resolutions 256 --batches 1 8 \
  --compile-batches 8 --max-seconds $((T - 40)) --out "$WORK"

# 5. the short table, last
python3 - "$WORK" <<'EOF' 2>&1 | tee "$WORK/summary.md"
import json, os, sys
sys.path.insert(0, "benchmarks")
import common
work = sys.argv[1]
print("# ditq GPU suite: short table\n")
print("```\n" + open(os.path.join(work, "stages.txt")).read() + "```\n")
def load(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except Exception as e:
        print(f"_{name}: not written ({type(e).__name__})_\n")
g, m, s = load("gemm.json"), load("model.json"), load("static_report.json")
if g:
    c = g["ceilings"]
    print(common.env_markdown(g["env"]) + "\n")
    print(f"Measured: bf16 {c['bf16_flops']/1e12:.4g} TFLOP/s, int8 {c['int8_ops']/1e12:.4g} TOP/s, "
          f"copy {c['copy_bytes_s']/1e9:.4g} GB/s\n")
    rows = [r for r in g["rows"] if r["layer"] == "mlp fc1" and r["M"] in (16, 512, 4096)]
    print(common.md_table(rows, ["layer", "M", "impl", "status", "median_ms", "tops", "roofline_fraction",
                                 "speedup_vs_bf16"]) + "\n")
if m and m.get("rows"):
    # the project's targets (H100, 256 px): best ditq variant vs bf16 torch.compile, weight bytes, peak memory
    def best(prec, batch):
        ok = [r for r in m["rows"] if r["precision"] == prec and r["batch"] == batch and r["resolution"] == 256
              and r["status"] == "ok"]
        return min(ok, key=lambda r: r["median_ms"]) if ok else None
    for batch, prec, want in ((8, "w8a8", 1.4), (8, "w4a8", 1.3), (1, "w4a8", 1.5)):
        b, c = best(prec, batch), next((r for r in m["rows"] if r["variant"] == "bf16 compile"
                                        and r["batch"] == batch and r["resolution"] == 256 and r["status"] == "ok"), None)
        ref = c or best("bf16", batch)
        if b and ref:
            print(f"- target {prec} batch {batch}: {ref['median_ms'] / b['median_ms']:.2f}x vs {ref['variant']} "
                  f"(want >= {want}x; best ditq variant: {b['variant']})")
    for prec, want in (("w8a8", 0.52), ("w4a8", 0.30)):
        r = next((r for r in m["rows"] if r["precision"] == prec and r.get("weight_ratio_vs_bf16")), None)
        if r:
            print(f"- weight bytes {prec}: {r['weight_ratio_vs_bf16']:.3f}x bf16 (want <= {want})")
    print()
    rows = [r for r in m["rows"] if r["batch"] in (1, 8)]
    print(common.md_table(rows, ["resolution", "batch", "variant", "status", "median_ms", "peak_mem_gib",
                                 "weight_ratio_vs_bf16", "speedup_vs_bf16_compile"]) + "\n")
elif m:
    print(f"model benchmark: {m.get('error')}\n")
if s:
    print(f"static report: {s['summary']}")
EOF

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_suite_results.tar.gz" -C "$WORK" . 2>/dev/null
  for f in summary.md gpu_suite.log gemm.json model.json static_report.json gemm_speedup.png model_latency.png; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
  done
  echo "results: $OUT (everything in gpu_suite_results.tar.gz)"
else
  echo "results: $WORK"
fi
echo "suite took $(($(date +%s) - START))s"
