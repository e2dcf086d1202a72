"""Convert between HF checkpoints and pipeline checkpoints.

    python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR
    python convert_model.py pp_to_hg --input-path PP_DIR --save-path HF_DIR [--tag global_step100]
"""
import argparse

from engine.cli import Parser, number, user_errors
from engine.checkpoints.convert import hf_to_pp, pp_to_hg


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["hg_to_pp", "pp_to_hg"])
    p.add_argument("--input-path", required=True)
    p.add_argument("--save-path", required=True)
    p.add_argument("--tag", default=None, help="pp_to_hg: checkpoint tag to export (default: the one 'latest' names)")
    p.add_argument("--max-shard-size", type=number(float, 0, low_open=True), default=5.0,
                   help="pp_to_hg: GiB per safetensors shard")
    a = p.parse_args(argv)
    if a.direction == "hg_to_pp":
        out = hf_to_pp(a.input_path, a.save_path)
    else:
        out = pp_to_hg(a.input_path, a.save_path, tag=a.tag, max_shard_bytes=int(a.max_shard_size * 2**30))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
