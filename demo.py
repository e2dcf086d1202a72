"""Chat with / generate from a trained model, with the training prompt templates.

    python demo.py --model ./checkpoints/llama-7b                  # pipeline checkpoint dir (latest tag)
    python demo.py --model ./llama-7b-tuned --type instruct        # HF dir (pp_to_hg output)
    python demo.py --model M --prompts prompts.jsonl --output answers.jsonl
    deepspeed --num_gpus 2 demo.py --model M                       # layers split over 2 GPUs (rank 0 runs)
"""
import argparse
import os
import sys
from pathlib import Path

from engine.cli import user_errors
from engine.inference.generate import KINDS, Chat, SamplingConfig, answer_file, interactive, load_lm, load_tokenizer


def text_arg(value):
    """TEXT, or @FILE for the file's contents."""
    return Path(value[1:]).read_text() if value and value.startswith("@") else value


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline checkpoint dir (<dir>/latest) or HF model dir")
    p.add_argument("--backend", choices=("ours", "hf"), default="ours",
                   help="ours: our layers, any source, split over --devices, KV cache; "
                        "hf: transformers on an HF dir, KV cache, one device")
    p.add_argument("--devices", help="comma-separated, e.g. cuda:0,cuda:1 (default: every visible GPU, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--type", choices=KINDS, default="conversation", help="prompt template (sample type)")
    p.add_argument("--template", default="auto",
                   help="auto (the tokenizer's chat template when it has one, else default), default (### User/"
                        "### Assistant layouts) or chat_template: as prompt_template in training")
    p.add_argument("--system", type=text_arg, help="system prompt (a chat template's system message), or @file")
    p.add_argument("--reference", type=text_arg, help="ref_qa reference text, or @file")
    p.add_argument("--api-desc", type=text_arg, help="conver_has_api api description, or @file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--prompts", help="JSONL / JSON array of prompts (sample dicts in prompt form, or strings)")
    p.add_argument("--output", help="answers JSONL for --prompts (default: <prompts>.answers.jsonl)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


@user_errors
def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if a.type == "ref_qa" and not a.reference or a.type == "conver_has_api" and not a.api_desc:
        p.error(f"--type {a.type} needs {'--reference' if a.type == 'ref_qa' else '--api-desc'}")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under a launcher, rank 0 alone places the layers on every local GPU
    lm = load_lm(a.model, a.backend, a.devices.split(",") if a.devices else None, a.dtype)
    tokenizer = load_tokenizer(lm)
    sampling = SamplingConfig(a.max_new_tokens, a.do_sample, a.temperature, a.top_k, a.top_p,
                              a.repetition_penalty, a.seed)
    if a.prompts:
        out = a.output or str(Path(a.prompts).with_suffix("")) + ".answers.jsonl"
        n = answer_file(lm, tokenizer, a.prompts, out, sampling, a.template, a.type,
                        log=lambda s: print(s, file=sys.stderr))
        print(f"{n} answers -> {out}", file=sys.stderr)
        return
    interactive(Chat(lm, tokenizer, a.type, sampling, a.template, a.reference, a.api_desc, lm.max_len, a.system))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading or answering a --prompts file: stop without a traceback
        print(file=sys.stderr)
        sys.exit(130)
