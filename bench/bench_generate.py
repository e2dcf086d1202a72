"""Generation speed: our backend (demo.py's default: our layers + KV cache) vs transformers' generate.

Same weights in both (a random model of a named shape, or a real HF dir), greedy decoding of
`--new-tokens` tokens after a `--prompt-len`-token prompt, EOS suppressed so both write exactly
that many. Ours runs the product path (engine.inference.generate.generate: logits processing,
streaming detokenization) on an OurLM; transformers runs model.generate with its own cache.
Prints one JSON line per backend and the ratio. On one CUDA device `ours` replays a CUDA graph
per token (static KV cache; demo.py's default there, `--cuda-graphs auto`); `ours_eager` (the
eager reference path, `--cuda-graphs off`) is then timed too, on the same modules, and its greedy
tokens are compared with the graphs'.

    python bench/bench_generate.py                                        # SmolLM2-135M shape, CPU, fp32
    python bench/bench_generate.py --shape llama-7b --device cuda:0 --dtype bf16
    python bench/bench_generate.py --model /path/to/hf-dir --device cpu   # a real model and its tokenizer
    python bench/bench_generate.py --shape narrow32 --threads 1           # launch-bound: 32 blocks, hidden 64
    python bench/bench_generate.py --shape narrow32 --count-ops           # aten ops of one decode step

Tokens/s = new tokens / wall time of the whole call (prefill included); the median of
`--repeats` runs after one warm-up run, backends alternating so that load on a shared machine
hits both alike.
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.utils._python_dispatch  # noqa: E402
import torch.utils._pytree  # noqa: E402

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct)'s config.json
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # llama-7b's depth at a width where every op is cheap: the per-token cost is the host's (Python,
    # dispatch, launches), which a 7B decode step on a GPU is bound by too
    "narrow32": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NoEosTokenizer:
    """Stands in for a random model's tokenizer: no EOS (exactly N tokens are written), and a cheap
    decode so streaming costs what it costs with a fast tokenizer."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def hf_model(a):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[a.dtype]
    if a.model:
        return AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    cfg = dict(SHAPES[a.shape])
    torch.manual_seed(0)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=dtype)
    return model.eval()


def our_lm(hf, a):
    """An OurLM holding the same tensors as `hf` (no copy through disk), all layers on a.device."""
    from engine.inference.generate import OurLM
    from models import family_for_hf_config
    from models.block_base import LayerOptions
    from models.keymap import from_hf
    from models.pipeline import SequentialModel

    config = hf.config.to_dict()
    family = family_for_hf_config(config, "config.json")
    args = family.Args.from_hf_config(config)
    weights, keys = hf.state_dict(), family.hf_keys(args)
    with torch.device("meta"):
        model = SequentialModel(family, args)
    shared = {}
    for i, d in enumerate(model.defs):
        if d.tie is not None and d.tie in shared:
            layer = shared[d.tie]
        else:
            with torch.device(a.device):
                layer = d.cls(args, LayerOptions())
            layer.load_state_dict(from_hf(keys[i], weights.__getitem__))
            layer.to(DTYPES[a.dtype])
            if d.tie is not None:
                shared[d.tie] = layer
        model._modules[str(i)] = layer
    model.eval()
    return OurLM(model, [torch.device(a.device)] * len(model.defs), Path(a.model) if a.model else None, family, args)


def eager_twin(lm):
    """The same modules through the eager KV-cache path (the reference)."""
    from engine.inference.generate import OurLM

    return OurLM(lm.model, lm.layer_devices, lm.hf_dir, lm.family, lm.args, static=False, graphs=False)


def path_of(lm) -> str:
    return "graphs" if lm.graphs else "static" if lm.static else "eager"


@torch.no_grad()
def teacher_forced(lms, prompt, tokens):
    """Both paths fed the same tokens (the eager path's greedy ones): per step, whether their argmax
    agrees, and the largest logit difference. Free-running tokens part at the first near-tie the
    two reduction orders break differently; this shows whether they differ by more than that."""
    logits = {}
    for name, lm in lms.items():
        lm.reset()
        lm.reserve(len(prompt) + len(tokens))
        steps = [lm.next_logits(list(prompt))]
        steps += [lm.next_logits([t]) for t in tokens[:-1]]
        logits[name] = torch.stack(steps)
    a, b = logits.values()
    top2 = b.topk(2, dim=-1).values
    differ = a.argmax(-1) != b.argmax(-1)
    return {"argmax_equal": int((~differ).sum()), "of": len(tokens),
            "max_abs_logit_diff": round(float((a - b).abs().max()), 4),
            "eager_top2_margin_where_differ": [round(float(m), 4) for m in (top2[:, 0] - top2[:, 1])[differ]]}


@torch.no_grad()
def replay_vs_uncaptured(lm, prompt, tokens) -> dict:
    """The graphs path's logits at every step of `tokens` against the same step run again without
    the capture (the compiled, or eager, static step): a decode step writes the same key/value at
    the same position, so running it twice changes nothing, and a correct capture gives the very
    same logits. Counts the steps whose logits are bitwise equal."""
    lm.reset()
    lm.reserve(len(prompt) + len(tokens))
    lm.next_logits(list(prompt))
    equal, worst = 0, 0.0
    for t in tokens[:-1]:
        replayed = lm.next_logits([t])
        again = (lm._compiled or lm._step)()[0, -1].float().cpu()
        equal += bool(torch.equal(replayed, again))
        worst = max(worst, float((replayed - again).abs().max()))
    return {"bitwise_equal_steps": equal, "of": len(tokens) - 1, "max_abs_diff": worst}


@torch.no_grad()
def profile_replay(lm, prompt, top: int = 15) -> dict:
    """torch.profiler (CUDA activity) over one decode step of the graphs path: the kernels of one
    replay by total time, their count, and the step's GPU kernel time against its wall time."""
    from torch.profiler import ProfilerActivity, profile

    lm.reset()
    lm.reserve(len(prompt) + 8)
    lm.next_logits(list(prompt))
    lm.next_logits([5])  # captured (and compiled) here
    lm.next_logits([6])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        lm.next_logits([7])
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:90], [0, 0.0])
            k[0] += 1
            k[1] += e.device_time / 1000
    total = sum(v[1] for v in kernels.values())
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    return {"step_wall_ms": round(1000 * wall, 3), "kernel_ms": round(total, 3),
            "kernels": sum(v[0] for v in kernels.values()),
            "top": [[name, n, round(ms, 3)] for name, (n, ms) in rows]}


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(lm, tokenizer, prompt, n, device):
    from engine.inference.generate import SamplingConfig, generate

    sync(device)
    start = time.perf_counter()
    out = generate(lm, tokenizer, prompt, SamplingConfig(max_new_tokens=n))
    sync(device)
    return time.perf_counter() - start, out.ids


@torch.no_grad()
def run_hf(model, prompt, n, device):
    ids = torch.tensor([prompt], device=device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    sync(device)
    return time.perf_counter() - start, out[0, len(prompt):].tolist()


class WritingOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that write memory (an in-place op, or an output in new storage): on a GPU
    each is a kernel launch; views and casts to the same dtype are not. (A graph replay is none.)"""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves

        def storages(x):
            return {t.untyped_storage().data_ptr() for t in leaves(x) if isinstance(t, torch.Tensor)}

        if func._schema.is_mutable or storages(out) - storages((args, kwargs)):
            self.count += 1
        return out


@torch.no_grad()
def count_ops(lms: dict, hf, prompt, steps: int = 0) -> dict:
    """aten ops (every level, as torch.profiler records them) of one decode step, one new token
    after the prompt and one decoded token: each of our `lms` (by path) and transformers' forward
    with its DynamicCache. steps > 0: also the min and median ms of that many further decode steps
    each (the min is what a loaded machine disturbs least)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    device = next(hf.parameters()).device

    def measure(step):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        with WritingOps() as writing:
            step()
        times = []
        for _ in range(steps):
            sync(str(device))
            start = time.perf_counter()
            step()
            sync(str(device))
            times.append(1000 * (time.perf_counter() - start))
        return sum(e.name.startswith("aten::") for e in prof.events()), writing.count, times

    results = {}
    for lm in lms.values():
        lm.reset()
        lm.reserve(len(prompt) + 3 + steps)
        lm.next_logits(list(prompt))
        lm.next_logits([5])  # graphs: captured here
        results[path_of(lm)] = measure(lambda: lm.next_logits([7]))
    # the cache argument's name, as HFLM picks it (`cache` in transformers >= 5.2x)
    cache = {"cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values":
             DynamicCache(config=hf.config)}
    for ids in (prompt, [5]):
        hf(torch.tensor([ids], device=device), use_cache=True, **cache)
    results["transformers"] = measure(lambda: hf(torch.tensor([[7]], device=device), use_cache=True, **cache))
    out = {"ops_per_decode_step": {name: r[0] for name, r in results.items()},
           "writing_ops_per_decode_step": {name: r[1] for name, r in results.items()},
           "layers": hf.config.num_hidden_layers}
    if steps:
        out["step_ms_min_median"] = {name: [round(min(r[2]), 3), round(statistics.median(r[2]), 3)]
                                     for name, r in results.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="random weights of this shape")
    p.add_argument("--model", help="a real HF model dir instead (its tokenizer is used for streaming)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--static", action="store_true",
                   help="our static-cache decode step even where no CUDA graph is captured (CPU, several devices)")
    p.add_argument("--profile", action="store_true", help="profile one replay of the graphs path (CUDA): top kernels")
    p.add_argument("--no-compile", action="store_true", help="graphs path: capture the eager static step (not compiled)")
    p.add_argument("--count-ops", action="store_true",
                   help="only count the aten ops of one decode step (ours, transformers) with torch.profiler, "
                        "and time --new-tokens further decode steps of each (min, median ms)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    hf = hf_model(a)
    lm = our_lm(hf, a)
    if lm.graphs_possible() and not lm.graphs:  # the path under test here (demo.py's default on one GPU)
        lm = type(lm)(lm.model, lm.layer_devices, lm.hf_dir, lm.family, lm.args, graphs=True)
    if a.no_compile:
        lm.compile_step = False
    if a.static and not lm.static:
        lm = type(lm)(lm.model, lm.layer_devices, lm.hf_dir, lm.family, lm.args, static=True)
    if a.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.model)
        tokenizer.eos_token_id  # noqa: B018 (real tokenizers stop at EOS: count the tokens actually written)
    else:
        tokenizer = NoEosTokenizer()
    prompt = torch.randint(3, hf.config.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    lms = {"ours": lm}
    if lm.static:
        lms["ours_eager"] = eager_twin(lm)
    if lm.graphs and lm.compile_step:  # the same graphs path capturing the uncompiled step: the compile's A/B
        lms["ours_uncompiled"] = type(lm)(lm.model, lm.layer_devices, lm.hf_dir, lm.family, lm.args, graphs=True)
        lms["ours_uncompiled"].compile_step = False
    if a.count_ops:
        print(json.dumps({"shape": a.model or a.shape, "device": a.device, "dtype": a.dtype}
                         | count_ops(lms, hf, prompt, a.new_tokens)))
        return
    first = {}
    for name, model in lms.items():  # warm-up: allocator, kernels, lazy imports; graphs: the capture
        # (a full-length warm-up, so that the capacity bucket of the timed runs is the one captured)
        first[name] = run_ours(model, tokenizer, prompt, a.new_tokens if model.graphs else 8, a.device)[0]
    run_hf(hf, prompt, 8, a.device)
    times = {name: [] for name in [*lms, "transformers"]}
    tokens = {}
    for _ in range(a.repeats):
        for name, model in lms.items():
            t, tokens[name] = run_ours(model, tokenizer, prompt, a.new_tokens, a.device)
            times[name].append(t)
        t, tokens["transformers"] = run_hf(hf, prompt, a.new_tokens, a.device)
        times["transformers"].append(t)
    params = sum(p.numel() for p in hf.parameters())

    def same_prefix(x, y):
        return next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))

    result = {}
    for name in times:
        n = len(tokens[name])
        med = statistics.median(times[name])
        result[name] = {"backend": name, "shape": a.model or a.shape, "params_m": round(params / 1e6, 1),
                        "device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(), "prompt": a.prompt_len,
                        "new_tokens": n, "seconds": [round(t, 3) for t in times[name]],
                        "tokens_per_s": round(n / med, 2), "ms_per_token": round(1000 * med / n, 2)}
        if name in lms:
            result[name] |= {"path": path_of(lms[name]), "warmup_s": round(first[name], 3)}
        print(json.dumps(result[name]))
    summary = {"ours_over_transformers": round(result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3),
               "greedy_tokens_equal_prefix": same_prefix(tokens["ours"], tokens["transformers"])}
    if "ours_uncompiled" in lms:
        summary["compiled_over_uncompiled"] = round(result["ours"]["tokens_per_s"]
                                                    / result["ours_uncompiled"]["tokens_per_s"], 3)
    if "ours_eager" in lms:
        agree = same_prefix(tokens["ours"], tokens["ours_eager"])
        summary |= {"ours_eager_over_transformers":
                    round(result["ours_eager"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3),
                    f"{path_of(lm)}_equal_eager_prefix": agree,
                    f"{path_of(lm)}_equal_eager_first_32": agree >= min(32, len(tokens["ours"])),
                    "teacher_forced": teacher_forced({"ours_eager": lms["ours_eager"], "ours": lm},
                                                     prompt, tokens["ours_eager"])}
    if lm.graphs:
        summary["replay_vs_uncaptured"] = replay_vs_uncaptured(lm, prompt, tokens["ours"])
        summary["compiled_step"] = lm.compile_step
    print(json.dumps(summary))
    if a.profile and lm.graphs:
        print(json.dumps({"profile_one_replay": profile_replay(lm, prompt)}))

if __name__ == "__main__":
    main()
