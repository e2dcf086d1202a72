"""Correctness of the GPU fast path on a tiny model (run on the GPU machine before timing it).

1. bf16 + FlexAttention + torch.compile on the GPU gives the CPU fp32 reference's loss (within
   bf16 tolerance).
2. Packed vs unpacked: every document's loss in a packed row equals its loss run alone.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import llama  # noqa: E402
from models.blocks import AttnOptions, LayerOptions  # noqa: E402
from models.pipeline import SequentialModel  # noqa: E402


def doc_losses(model, ids, pos, lengths):
    logits = model(ids, pos).float()
    out, start = [], 0
    for n in lengths:
        out.append(F.cross_entropy(logits[0, start:start + n - 1], ids[0, start + 1:start + n]).item())
        start += n
    return out


def main():
    hf = llama.tiny_hf_config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                              vocab_size=512, max_position_embeddings=1024)
    args = llama.Args.from_hf_config(hf)
    g = torch.Generator().manual_seed(0)
    lengths = [300, 120, 200, 404]
    ids = torch.randint(3, 512, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    torch.manual_seed(0)
    ref = SequentialModel(llama, args, LayerOptions(attn=AttnOptions(packed=True, impl="sdpa"))).eval()
    state = ref.state_dict()
    with torch.no_grad():
        cpu = doc_losses(ref, ids, pos, lengths)
        fast = SequentialModel(llama, args, LayerOptions(attn=AttnOptions(packed=True, impl="flex"), compile=True))
        fast.load_state_dict(state)
        fast = fast.cuda().bfloat16().eval()
        gpu = doc_losses(fast, ids.cuda(), pos.cuda(), lengths)
        alone_model = SequentialModel(llama, args, LayerOptions(attn=AttnOptions(packed=False, impl="sdpa")))
        alone_model.load_state_dict(state)
        alone_model = alone_model.cuda().bfloat16().eval()
        alone, start = [], 0
        for n in lengths:
            seg = ids[:, start:start + n].cuda()
            alone += doc_losses(alone_model, seg, torch.arange(n)[None].cuda(), [n])
            start += n
    print("per-document loss  cpu fp32:", [round(x, 4) for x in cpu])
    print("                   gpu bf16 flex+compile (packed):", [round(x, 4) for x in gpu])
    print("                   gpu bf16 sdpa (each alone):    ", [round(x, 4) for x in alone])
    worst_ref = max(abs(a - b) / a for a, b in zip(cpu, gpu))
    worst_pack = max(abs(a - b) / a for a, b in zip(alone, gpu))
    print(f"max rel diff vs cpu fp32: {worst_ref:.2e}; packed vs alone: {worst_pack:.2e}")
    assert worst_ref < 2e-2 and worst_pack < 2e-2, "GPU fast path disagrees"
    print("GPU CHECK PASS")


if __name__ == "__main__":
    main()
