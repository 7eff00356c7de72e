#!/usr/bin/env bash
# The one prepared GPU check (../shared/design/CPU_AND_GPU.md), under 8 minutes on one H100:
#   1. installs the wheels carried in .whl/ (the GPU image has torch, triton and transformers,
#      not mosaicml-streaming or liger-kernel), and makes fastross importable without building it;
#   2. runs the tests marked `gpu` (kernels compiled for real, fp32 and bf16, against references);
#   3. runs the kernel microbenchmarks at the 7B recipe's shapes (the denoiser first: its last
#      line is the headline), and the end-to-end ladder benchmarks/throughput.py when it exists;
#   4. writes a dated markdown table and the CSV under $OUT (default benchmarks/results/), and
#      prints the summary last.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run       # anywhere: smoke shapes, Triton interpreter (checks the script)
#
# Carrying wheels (on a CPU machine, once; see the device tool's README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl liger-kernel==0.8.5 mosaicml-streaming==0.13.0
# and name `.whl` in the run's carry. The kernel tests and benchmarks need neither.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date +%Y-%m-%d_%H%M)
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
CSV="$OUT/gpu_check_${STAMP}.csv"
MD="$OUT/gpu_check_${STAMP}.md"
LOG="$OUT/gpu_check_${STAMP}.log"
export PYTHONUNBUFFERED=1
SMOKE=()
if [ "${1:-}" = "--dry-run" ]; then
    SMOKE=(--smoke --providers reference,torch_bf16,fastross); export TRITON_INTERPRET=1
else
    export TRITON_INTERPRET=0
fi
START=$SECONDS
exec > >(tee -a "$LOG") 2>&1

echo "== gpu_check $STAMP ${1:-}"
[ ${#SMOKE[@]} -gt 0 ] || nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU here (--dry-run checks the script)"; exit 2; }

# 1. wheels, and fastross on the path (kernels/ is the subpackage fastross.kernels)
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastross-site .whl/*.whl \
        && export PYTHONPATH=/tmp/fastross-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c "import fastross.kernels" 2>/dev/null; then  # not installed here: link the subpackage for this run
    ln -s ../kernels fastross/kernels && trap 'rm -f fastross/kernels' EXIT
fi
export FASTROSS_COMMIT=${FASTROSS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

# 2. tests marked gpu (one tile config: compiling every autotuning config for every test shape costs minutes)
echo "== tests marked gpu"
FASTROSS_AUTOTUNE=0 timeout 120 $PY -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors \
    2>&1 | tail -n 40
TESTS=${PIPESTATUS[0]}

# 3. benchmarks, the headline first; each bounded so the whole check stays under 8 minutes
bench() {  # seconds, script, args...
    local limit=$1 script=$2; shift 2
    echo "== $script $*"
    timeout "$limit" $PY "benchmarks/kernels/$script" --csv "$CSV" "${SMOKE[@]}" "$@" || echo "$script: exit $? (timeout: 124)"
}
bench 180 bench_denoiser.py
bench 60 bench_fused_mlp.py
bench 40 bench_ln_modulate.py
bench 40 bench_diffusion_loss.py
bench 30 bench_adaln.py
echo "== text loss: plain CE against Liger's fused CE (time and peak memory at the 7B shapes)"
timeout 90 $PY benchmarks/text_loss.py || echo "text_loss.py: exit $? (timeout: 124)"
# benchmarks/throughput.py (the ladder) runs the tiny CPU recipe only so far; its GPU mode (the 7B slice) is to come.

# 4. the dated markdown table, then the summary last
$PY - "$CSV" "$MD" "$LOG" "$TESTS" "$((SECONDS - START))" <<'EOF'
import csv, re, sys
csv_path, md_path, log_path, tests_rc, wall = sys.argv[1:]
rows = list(csv.DictReader(open(csv_path))) if __import__("os").path.exists(csv_path) else []
summary = list(dict.fromkeys(  # each bench's closing lines, once each
    l.rstrip() for l in open(log_path) if re.match(r"^(denoiser|fused_mlp|ln_modulate|adaln|diffusion_loss)[ :]", l)
    and ("vs_reference" in l or "of_floor" in l or "% of copy" in l)))
head = rows[0] if rows else {}
lines = [f"# gpu_check {head.get('date', '')[:10]}", "",
         f"device: {head.get('device', '?')}; commit {head.get('commit', '?')}; gpu tests exit {tests_rc}; wall {wall} s", "",
         "| bench | shape | provider | mode | ms | peak MiB | TFLOP/s | GB/s | floor ms |", "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append("| " + " | ".join([r["bench"], r["shape"], r["provider"], r["mode"]] +
                 [r[k] for k in ("ms", "peak_mib", "tflops", "gbps", "floor_ms")]) + " |")
lines += ["", "```", *summary, "```", ""]
open(md_path, "w").write("\n".join(lines))
print("\n".join(lines[:3]))
print("\n".join(summary))
EOF
echo "gpu_check: wrote $MD, $CSV, $LOG in $((SECONDS - START)) s"
