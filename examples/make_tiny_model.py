"""Write a tiny random HF model + sentencepiece tokenizer trained on the example data.

    python examples/make_tiny_model.py --family llama --save-path runs/quickstart/tiny-llama-hf
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.tiny import make_tiny_hf_model, sample_texts  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama")
    p.add_argument("--save-path", required=True)
    a = p.parse_args()
    data = sorted((Path(__file__).parent / "data").glob("*.json*"))
    print(f"wrote {make_tiny_hf_model(a.save_path, a.family, sample_texts(data))}")
