#!/usr/bin/env bash
# The whole toolkit on a laptop CPU in under two minutes: a tiny random llama and a tokenizer
# trained on examples/data -> pipeline checkpoint -> 2-process pipeline training -> HF model ->
# loaded by plain transformers and generating.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/quickstart
rm -rf "$OUT"
export OMP_NUM_THREADS=1
python examples/make_tiny_model.py --family llama --save-path "$OUT/tiny-llama-hf"
python convert_model.py hg_to_pp --input-path "$OUT/tiny-llama-hf" --save-path "$OUT/tiny-llama-pp"
deepspeed --num_gpus 2 train_ds.py --config configs/tiny_llama_cpu.yml
python convert_model.py pp_to_hg --input-path "$OUT/ckpt" --save-path "$OUT/tiny-llama-trained-hf"
python examples/generate.py "$OUT/tiny-llama-trained-hf" "Below is an instruction that describes a task."
