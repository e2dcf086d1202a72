"""Convert between HF checkpoints and pipeline checkpoints.

    python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR     # HF_DIR may be a hub id (org/name)
    python convert_model.py download --model-name org/name --save-path HF_DIR   # a hub model into a plain dir
    python convert_model.py pp_to_hg --input-path PP_DIR --save-path HF_DIR [--tag global_step100] [--dtype auto]
    python convert_model.py pp_to_hg --input-path LORA_RUN --lora-adapter OUT      # a LoRA run: PEFT adapter dir
    python convert_model.py pp_to_hg --input-path LORA_RUN --save-path HF_DIR --merge-lora   # or merged into its base
    python convert_model.py pp_to_hg --input-path BASE --adapter PEFT_DIR --save-path HF_DIR --merge-lora
    python convert_model.py pp_to_hg --input-path PEFT_DIR --save-path HF_DIR --merge-lora  # base: its base_model_name_or_path
    python convert_model.py verify DIR [--tag global_step100]   # every file's size + checksum, nothing loaded
"""
import argparse
from pathlib import Path

from engine.cli import Parser, number, user_errors
from engine.checkpoints.convert import hf_to_pp, pp_to_hg
from engine.checkpoints.hub import fetch, model_source
from engine.checkpoints.integrity import check_dir
from engine.checkpoints.lora import export_adapter


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["hg_to_pp", "pp_to_hg", "verify", "download"])
    p.add_argument("dir", nargs="?", help="verify: a pipeline checkpoint dir or an HF model dir")
    p.add_argument("--input-path", help="hg_to_pp: an HF model dir or a hub id (from the HF cache, else downloaded)")
    p.add_argument("--model-name", help="download: hub id, e.g. bigscience/bloomz-7b1-mt")
    p.add_argument("--save-path")
    p.add_argument("--tag", default=None, help="pp_to_hg, verify: checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="pp_to_hg: dtype of the exported tensors (auto: the source model's, from its config.json)")
    p.add_argument("--lora-adapter", metavar="OUT",
                   help="pp_to_hg of a LoRA run: write its adapters as a PEFT adapter dir (for PeftModel.from_pretrained)")
    p.add_argument("--merge-lora", action="store_true",
                   help="pp_to_hg of a LoRA run or a PEFT adapter dir (or --adapter): write its base model with the "
                        "adapters merged in (--save-path), in fp32 before the cast to --dtype")
    p.add_argument("--adapter", metavar="DIR",
                   help="pp_to_hg --merge-lora: a PEFT adapter dir (or a LoRA run) to merge into --input-path, a "
                        "pipeline or HF dir")
    p.add_argument("--max-shard-size", type=number(float, 0, low_open=True), default=5.0,
                   help="pp_to_hg: GiB per safetensors shard")
    a = p.parse_args(argv)
    if a.direction == "verify":
        if not (a.dir or a.input_path):
            p.error("verify needs a directory")
        print(check_dir(a.dir or a.input_path, a.tag))
        return
    if a.adapter is not None and (a.direction != "pp_to_hg" or not a.merge_lora):
        p.error("--adapter is merged by pp_to_hg --merge-lora")
    if a.direction == "pp_to_hg" and a.lora_adapter is not None:
        if a.merge_lora or a.save_path:
            p.error("--lora-adapter writes the adapter alone: leave out --save-path and --merge-lora")
        if a.input_path is None:
            p.error("pp_to_hg needs --input-path")
        print(f"wrote {export_adapter(a.input_path, a.lora_adapter, tag=a.tag)}")
        return
    for flag in ("model_name", "save_path") if a.direction == "download" else ("input_path", "save_path"):
        if getattr(a, flag) is None:
            p.error(f"{a.direction} needs --{flag.replace('_', '-')}")
    if a.direction == "download":
        out = fetch(a.model_name, a.save_path)
    elif a.direction == "hg_to_pp":
        given = a.input_path if not Path(a.input_path).exists() else str(Path(a.input_path).absolute())
        out = hf_to_pp(model_source(a.input_path), a.save_path, source_name=given)  # given: PEFT's base name
    else:
        out = pp_to_hg(a.input_path, a.save_path, tag=a.tag, max_shard_bytes=int(a.max_shard_size * 2**30),
                       dtype=a.dtype, merge_lora=a.merge_lora, adapter=a.adapter)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
