#!/usr/bin/env bash
# One device call running several benches in priority order under one deadline, so a slow step
# cannot eat the others' time: each step is "name|seconds|command"; steps whose turn comes after
# the deadline (DEADLINE seconds after start, default 560) are skipped and named. Output of each
# step goes to $OUT/<name>.txt (its last lines are echoed); bench_train cases print their table last.
#   STEPS_FILE=bench/steps_a.txt bash bench/round.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
start=$(date +%s); deadline=$((start + ${DEADLINE:-560}))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
while IFS='|' read -r name secs cmd; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  left=$((deadline - $(date +%s)))
  if [[ $name != table* ]]; then  # a table step always runs: it reports what the others left
    if (( left < 20 )); then echo "=== $name: skipped (deadline)"; continue; fi
    (( secs > left )) && secs=$left
  fi
  echo "=== $name (limit ${secs}s, t=$(( $(date +%s) - start ))s)"
  timeout "$secs" bash -c "$cmd" > "$OUTDIR/$name.txt" 2>&1
  echo "exit $? t=$(( $(date +%s) - start ))s"; grep -v -i warn "$OUTDIR/$name.txt" | tail -${TAIL:-6} | cut -c1-400
done < "${STEPS_FILE:?a steps file}"
