"""Chat with / generate from a trained model, with the training prompt templates.

    python demo.py --model ./checkpoints/llama-7b                  # pipeline checkpoint dir (latest tag)
    python demo.py --model ./llama-7b-tuned --type instruct        # HF dir (pp_to_hg output)
    python demo.py --model BASE --adapter ADAPTER                  # a PEFT adapter dir (or a LoRA run) on BASE
    python demo.py --model ADAPTER                                 # a PEFT adapter dir on its base_model_name_or_path
    python demo.py --model M --prompts prompts.jsonl --output answers.jsonl
    deepspeed --num_gpus 2 demo.py --model M                       # layers split over 2 GPUs (rank 0 runs)
"""
import argparse
import os
import sys
from pathlib import Path

from data.templates import TEMPLATES
from engine.checkpoints.files import locate
from engine.checkpoints.hub import model_source
from engine.cli import Parser, number, user_errors
from engine.inference.generate import (DTYPES, KINDS, Chat, SamplingConfig, answer_file, default_devices,
                                       interactive, load_lm, load_tokenizer)


GDGPT_SAVE_PATH = "checkpoints"


def text_arg(value):
    """TEXT, or @FILE for the file's contents (UTF-8)."""
    if not (value and value.startswith("@")):
        return value
    try:
        return Path(value[1:]).read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{value[1:]}: cannot be read ({e.strerror})")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise argparse.ArgumentTypeError(f"{value[1:]}: line {line}: byte 0x{e.object[e.start]:02x} is not UTF-8")


def devices_arg(value):
    """Comma-separated torch devices that exist here."""
    import torch

    names = [d.strip() for d in value.split(",")]
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"{name!r} is not a device (e.g. cpu, cuda:0)")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{name}: this machine has {torch.cuda.device_count()} GPU(s)")
        if dev.type not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"{name}: only cpu and cuda devices are supported")
    return names


def parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="pipeline checkpoint dir (<dir>/latest), HF model dir, gdGPT checkpoint dir, or a hub id "
                        "(from the HF cache, else downloaded); default: ./checkpoints (gdGPT's save_path)")
    p.add_argument("--adapter", metavar="DIR",
                   help="LoRA adapters on --model: a PEFT adapter dir (adapter_config.json, as save_pretrained or "
                        "pp_to_hg --lora-adapter write it) or, --backend ours, a LoRA run's save_path; not merged")
    p.add_argument("--backend", choices=("ours", "hf"), default="ours",
                   help="ours: our layers, any source, split over --devices, KV cache; "
                        "hf: transformers on an HF dir, KV cache, one device")
    p.add_argument("--devices", type=devices_arg,
                   help="comma-separated, e.g. cuda:0,cuda:1 (default: every visible GPU, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="--backend ours: each new token one replay of a captured CUDA graph over a static KV cache; "
                        "auto (default): where possible (every layer on one GPU, no MoE), else the eager path; "
                        "on: an error where not possible; off: always the eager path")
    p.add_argument("--type", choices=KINDS, default="conversation", help="prompt template (sample type)")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="auto (the tokenizer's chat template when it has one, else default), default (### User/"
                        "### Assistant layouts), chat_template, or gdgpt (gdGPT's layout): as prompt_template "
                        "in training")
    p.add_argument("--system", type=text_arg, help="system prompt (a chat template's system message), or @file")
    p.add_argument("--reference", type=text_arg, help="ref_qa reference text, or @file")
    p.add_argument("--api-desc", type=text_arg, help="conver_has_api api description, or @file")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0)
    p.add_argument("--top-k", type=number(int, 0), default=0)
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--seed", type=number(int, 0), default=None, help="sampling seed (default: random)")
    p.add_argument("--prompts", help="JSONL / JSON array of prompts (sample dicts in prompt form, or strings)")
    p.add_argument("--output", help="answers JSONL for --prompts (default: <prompts>.answers.jsonl)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_prompts(path: str, kind: str) -> None:
    from data.samples import SampleError, parse_sample
    from engine.inference.generate import read_prompts

    if not Path(path).is_file():
        raise SampleError(path, None, None, "--prompts: no such file")
    prompts = read_prompts(path, kind)
    if not prompts:
        raise SampleError(path, None, None, "--prompts: no prompts in the file")
    for i, p in enumerate(prompts):
        parse_sample(p, path, i, for_prompt=True)


def check_output(out: str) -> None:
    from engine.checkpoints.files import LayoutError

    parent = Path(out).absolute().parent
    if Path(out).is_dir():
        raise LayoutError(f"{out}: --output is a directory; give a file name")
    if not parent.is_dir():
        raise LayoutError(f"{out}: --output's directory {parent} does not exist")


def default_model(p) -> str:
    """gdGPT's `deepspeed demo.py` took no model argument; its training wrote to ./checkpoints."""
    if not Path(GDGPT_SAVE_PATH).is_dir():
        p.error(f"--model is required (no {GDGPT_SAVE_PATH} here, the save_path gdGPT's demo read by default)")
    return GDGPT_SAVE_PATH


def take_ctrl_c() -> None:
    """Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at start, and
    some starters pass it on ignored (a background job of a non-interactive shell, several test
    runners and IDE consoles): Ctrl-C then did nothing, an answer ran on to --max-new-tokens. Run
    in the foreground of its terminal, the demo is the one Ctrl-C is meant for: take it back
    there. A real background job (not the terminal's foreground) keeps it ignored."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return
    try:
        foreground = os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return
    if foreground:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def terminal_input(prompt: str) -> str:
    """input() for a terminal, without its window for a lost Ctrl-C: input() writes the prompt and
    then blocks in read(); a SIGINT that lands between the two (a Ctrl-C pressed as the prompt
    appears) has its handler wait for the next line, so nothing happened. Here the signal's wakeup
    byte ends the wait, and its KeyboardInterrupt follows at once. The terminal stays in its own
    line mode (its editing keys, Ctrl-D for end of input)."""
    import select
    import signal

    sys.stdout.write(prompt)
    sys.stdout.flush()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    try:
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([0, wake_r], [], [])  # a handler's exception propagates (PEP 475)
            if wake_r in ready:  # a signal came in: its handler runs before the next line of Python
                os.read(wake_r, 512)
                continue
            chunk = os.read(0, 4096)
            if not chunk:  # Ctrl-D: end of input at the start of a line, else the end of that line
                if not data:
                    raise EOFError
                break
            data += chunk
        return data.decode("utf-8", errors="replace").removesuffix("\n")
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)


@user_errors
def main(argv=None):
    take_ctrl_c()
    p = parser()
    a = p.parse_args(argv)
    if a.type == "ref_qa" and not a.reference or a.type == "conver_has_api" and not a.api_desc:
        p.error(f"--type {a.type} needs {'--reference' if a.type == 'ref_qa' else '--api-desc'}")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under a launcher, rank 0 alone places the layers on every local GPU
    if a.prompts:  # every input checked before the model is loaded
        out = a.output or str(Path(a.prompts).with_suffix("")) + ".answers.jsonl"
        check_prompts(a.prompts, a.type)
        check_output(out)
    model = model_source(a.model or default_model(p))
    if a.template == "auto" and locate(model).gdgpt:  # tuned by gdGPT: serve it the text it was trained on
        a.template = "gdgpt"
        print(f"note: {model}: a gdGPT checkpoint: prompts in gdGPT's layout (--template gdgpt; pass --template "
              "to choose another)", file=sys.stderr)
    if a.cuda_graphs == "on":
        if a.backend == "hf":
            p.error("--cuda-graphs on needs --backend ours (transformers' model has no graph path here)")
        devices = a.devices or default_devices()
        if len(devices) != 1 or not devices[0].startswith("cuda"):
            p.error(f"--cuda-graphs on needs every layer on one GPU (devices here: {','.join(devices)}); "
                    "use auto or off")
    lm = load_lm(model, a.backend, a.devices, a.dtype, graphs=False if a.cuda_graphs == "off" else None,
                 adapter=a.adapter)
    if a.cuda_graphs == "on" and not lm.graphs:  # on one GPU: only MoE routing rules it out
        p.error(f"--cuda-graphs on: {model}: an MoE model (its expert dispatch has data-dependent shapes); "
                "use auto or off")
    tokenizer = load_tokenizer(lm)
    sampling = SamplingConfig(a.max_new_tokens, a.do_sample, a.temperature, a.top_k, a.top_p,
                              a.repetition_penalty, a.seed)
    if a.prompts:
        n = answer_file(lm, tokenizer, a.prompts, out, sampling, a.template, a.type,
                        log=lambda s: print(s, file=sys.stderr))
        print(f"{n} answers -> {out}", file=sys.stderr)
        return
    interactive(Chat(lm, tokenizer, a.type, sampling, a.template, a.reference, a.api_desc, lm.max_len, a.system),
                read=terminal_input if os.isatty(0) else input)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading or answering a --prompts file: stop without a traceback
        print(file=sys.stderr)
        sys.exit(130)
