"""Load an exported HF dir with plain transformers and generate: proof the export is usable.

    python examples/generate.py runs/quickstart/tiny-llama-trained-hf "Below is an instruction"
"""
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

if __name__ == "__main__":
    path, prompt = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "Hello")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"{type(model).__name__} from {path}:\n{tok.decode(out[0], skip_special_tokens=True)}")
