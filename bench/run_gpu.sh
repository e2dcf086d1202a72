#!/usr/bin/env bash
# One device call: install carried wheels, check the fast path's numerics, then time the cases
# given as arguments ("[VAR=value ...] name seq [--set k=v ...]" per case, ';'-separated; the
# variables are set for that case only) and print the table.
# Example (2 GPUs): bash bench/run_gpu.sh "pp2_s2048 2048 --set model_topo.process_topology.dims=[2,1]"
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
BENCH=${BENCH:-/tmp/bench}
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
[ -n "${SKIP_CHECK:-}" ] || python3 bench/gpu_check.py 2>&1 | grep -v Warning | grep -E "rel diff|graph breaks|PASS|FAIL|skipped|wgrad|weight grads" | tail -70
[ -d $BENCH/llama7b ] || python3 bench/bench_train.py prepare --out $BENCH --samples ${SAMPLES:-4000} --shape ${SHAPE:-7b} ${LAYERS:+--layers $LAYERS} | tail -1
# other families' stage-sized models (bench_train.py FAMILY_SHAPES): FAMILIES="bloom-7b1 mixtral-8x7b ..."; a case
# or REF entry then names one with --family NAME
for fam in ${FAMILIES:-}; do [ -d $BENCH/$fam ] || python3 bench/bench_train.py prepare --out $BENCH --family $fam --samples ${SAMPLES:-4000} | tail -1; done
# product cases (bench_train.py: the product's own path)
IFS=';' read -ra CASES <<< "$1"
for case in "${CASES[@]}"; do
  read -ra parts <<< "$case"
  envs=(); while [[ ${#parts[@]} -gt 0 && ${parts[0]} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do envs+=("${parts[0]}"); parts=("${parts[@]:1}"); done
  [ ${#parts[@]} -gt 0 ] || continue
  name=${parts[0]}; seq=${parts[1]}; rest=("${parts[@]:2}")
  echo "=== $name (seq $seq) ${envs[*]} $(date +%T)"
  env "${envs[@]}" timeout ${CASE_TIMEOUT:-400} torchrun --nproc_per_node "$NGPU" bench/bench_train.py run --out $BENCH --name "$name" \
    --seq "$seq" "${rest[@]}" > "$OUTDIR/$name.log" 2>&1
  echo "exit $? $(date +%T)"; grep -E "Error|error:|Traceback|OutOfMemory" "$OUTDIR/$name.log" | grep -v Warning | tail -3
done
# reference stages (bench/ref_stage.py, one GPU, no data pipeline): REF="name [args]; ..."
IFS=';' read -ra REFS <<< "${REF:-}"
for case in "${REFS[@]}"; do
  read -ra parts <<< "$case"
  [ ${#parts[@]} -gt 0 ] || continue
  echo "=== ${parts[0]} (reference) $(date +%T)"
  timeout ${CASE_TIMEOUT:-400} python3 bench/ref_stage.py --out $BENCH --name "${parts[0]}" ${SHAPE:+--shape $SHAPE} \
    ${LAYERS:+--layers $LAYERS} "${parts[@]:1}" > "$OUTDIR/${parts[0]}.log" 2>&1
  echo "exit $? $(date +%T)"; grep -E "tok/s|Error|error:|Traceback|OutOfMemory" "$OUTDIR/${parts[0]}.log" | grep -v Warning | tail -3
done
[ -z "${ATTN_BENCH:-}" ] || python3 bench/attn_bench.py 2>&1 | grep -v Warning | tee "$OUTDIR/attn.txt"
for f in $BENCH/runs/*/profile/*; do cp "$f" "$OUTDIR/$(basename "$(dirname "$(dirname "$f")")")_$(basename "$f")"; done 2>/dev/null
for f in "$OUTDIR"/*_top.txt; do [ -f "$f" ] && { echo "--- $f"; head -32 "$f"; }; done
python3 bench/bench_train.py table --out $BENCH --warmup ${WARMUP:-3} | tee "$OUTDIR/table.txt"
(cd "$OUTDIR" && tar czf logs.tgz ./*.log && rm ./*.log) 2>/dev/null  # few files come back from a device call
