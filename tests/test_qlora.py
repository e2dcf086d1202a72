"""QLoRA (`lora.base_quant: nf4`, models/quant.py): the frozen block linears in torchao's NF4Tensor.

In-process: a quantized block computes what the same block with the dequantized weights computes,
takes the plain (not wgrad-fused) path, traces as one graph and compiles, and keeps no dequantized
weight for backward (eager or compiled); the full-precision weights are freed; the dry run's weights
equal the module's real storage and its peak holds one transient dequantized weight. Runs (2 CPU ranks, pp=2,
bf16): the nf4 base's losses stay near the bf16 base's, only adapters train and are saved, no
full-precision block weight survives anywhere; under the real launcher a stop at step 6 and a
resume give the uninterrupted run's losses bitwise; the adapter export loads in PeftModel on the
full-precision base and equals the merged export. Config errors are one line."""
import gc
import json
import weakref

import pytest
import torch
from torch import nn

from engine.config import ConfigError, from_dict, validate
from models import get_family
from models.block_base import BlockBase, LayerOptions
from models.lora import LoraSpec, add_lora
from models.pipeline import SequentialModel
from models.quant import frozen_linears, is_nf4, nf4_nbytes, quantizable, quantize_block, storage_nbytes
from tests.test_lora import lora_config
from tests.test_train import config

NF4_LORA = {"r": 4, "alpha": 32.0, "target_modules": "all-linear", "base_quant": "nf4"}
# nf4 vs bf16 base, same adapters and data, pp=2, 12 steps at lr 3e-2 (losses ~5.7). Measured here:
# step 1 (B = 0: the base's quantization error alone) 0.0013, mean over the steps 0.020, max 0.099
# (lr 3e-2 amplifies the small differences of one step into the next ones' batches).
STEP1_TOL, MEAN_TOL, MAX_TOL = 0.01, 0.04, 0.15


def _tiny(dtype=torch.bfloat16, fused_wgrad=False):
    """The tiny llama as one module, all-linear LoRA (B random, so the adapters count), in `dtype`."""
    from models.fused_linear import fuse_wgrad

    fam = get_family("llama")
    args = fam.Args.from_hf_config(fam.tiny_hf_config())
    model = SequentialModel(fam, args, LayerOptions())
    if fused_wgrad:
        for _, layer in model.owned_layers():
            if isinstance(layer, BlockBase):
                fuse_wgrad(layer)
    spec = LoraSpec(r=4, alpha=8.0)
    add_lora(model.owned_layers(), fam, args, spec, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return fam, args, spec, model.to(dtype)


def _quantize(fam, args, spec, model) -> int:
    """What a run does to its loaded blocks: the frozen linears in NF4 (here on the CPU, bf16)."""
    keys = fam.hf_keys(args)
    return sum(quantize_block(layer, frozen_linears(fam, args, spec, keys[idx]), torch.device("cpu"), torch.bfloat16)
               for idx, layer in model.owned_layers() if isinstance(layer, BlockBase))


def _block_weights(model):
    return {(i, n): m for i, layer in model.owned_layers() if isinstance(layer, BlockBase)
            for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def test_quantized_block_equals_dequantized_weights_frees_originals_and_compiles():
    fam, args, spec, model = _tiny(fused_wgrad=True)
    linears = _block_weights(model)
    originals = [weakref.ref(m.weight) for m in linears.values()]
    n = _quantize(fam, args, spec, model)
    assert n == len(linears) == 4 * len(quantizable(fam, args)) == 16
    gc.collect()
    assert all(r() is None for r in originals)  # the full-precision block weights are gone
    assert all(is_nf4(m.weight) for m in linears.values())
    assert not any(is_nf4(p) for p in model.parameters())  # no 4-bit weight is a parameter (DeepSpeed sees none)
    for m in linears.values():  # torchao's storage, counted as the dry run counts it
        assert storage_nbytes(m.weight) == nf4_nbytes(m.weight.numel(), 2)
        assert storage_nbytes(m.weight) < m.weight.numel() * 0.6

    # the same block with the dequantized weights as ordinary parameters computes the same, bitwise
    block = model._modules["1"]
    twin = _tiny(fused_wgrad=True)[3]._modules["1"]
    twin.load_state_dict({k: v for k, v in block.state_dict().items()}, strict=False)
    for name, m in twin.named_modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(block.get_submodule(name).weight.to(torch.bfloat16), requires_grad=False)
    pos = torch.arange(16)[None].repeat(2, 1)
    x = torch.randn(2, 16, fam.dims(args).hidden, dtype=torch.bfloat16)
    outs = []
    for b in (block, twin):
        xi = x.clone().requires_grad_()
        y = b((xi, pos))[0]
        y.float().square().sum().backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in b.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=0, rtol=0)
    assert outs[0][2].keys() == outs[1][2].keys() and all(".lora_" in k for k in outs[0][2])
    for k, g in outs[0][2].items():  # adapters get gradients; the wgrad-fused path was not taken (no main_grad)
        torch.testing.assert_close(g, outs[1][2][k], atol=0, rtol=0)

    # compile_blocks: the quantized block traces as one graph and compiles (AOT autograd, no codegen)
    from models.masks import attention_mask
    mask = attention_mask(pos, block.attn_opts, block.window)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block.block)(x, pos, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(block.block, backend="aot_eager", dynamic=False)
    xc = x.clone().requires_grad_()
    yc = compiled(xc, pos, mask)
    yc.float().square().sum().backward()
    torch.testing.assert_close(yc, outs[0][0], atol=2e-2, rtol=0)  # bf16: the graph may fuse/round apart
    torch.testing.assert_close(xc.grad, outs[0][1], atol=5e-2, rtol=2e-2)
    # the stage's other quantized blocks reuse that graph (their NF4 weights are inputs, not guarded constants)
    from torch._dynamo.utils import counters
    counters.clear()
    for i in ("2", "3", "4"):
        torch.compile(model._modules[i].block, backend="aot_eager", dynamic=False)(x, pos, mask)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one (x without grad) for all three


def test_no_dequantized_weight_is_saved_for_backward():
    """Whatever autograd keeps between a quantized block's forward and backward (saved_tensors_hooks
    see every saved tensor, a compiled graph's too) holds no full-precision [out, in] weight of a
    frozen linear: eager, and compiled as compile_blocks compiles it (fixed shapes; the min-cut
    partitioner over inductor's decompositions, which alone decides what the graph saves; inductor's
    code generation is left out for time). Before the opaque ppllm::nf4_linear op, compiling
    inlined torchao's LinearNF4 and the partitioner kept all 4 dequantized weights of the block
    (inductor on the CPU did the same), so the 4-bit base saved no memory. The NF4Tensor itself or
    its 4-bit parts may be kept: they are the stage's own weights."""
    from models.masks import attention_mask

    fam, args, spec, model = _tiny()
    _quantize(fam, args, spec, model)
    block = model._modules["1"]
    shapes = {tuple(m.weight.shape) for m in block.modules() if isinstance(m, nn.Linear) and is_nf4(m.weight)}
    assert len(shapes) == 4  # tiny llama: qkv, o, gate_up, down
    pos = torch.arange(16)[None].repeat(2, 1)
    mask = attention_mask(pos, block.attn_opts, block.window)
    x = torch.randn(2, 16, fam.dims(args).hidden, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(block.block, backend="aot_eager_decomp_partition", dynamic=False)
    for name, fn in (("eager", block.block), ("compiled", compiled)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x.clone().requires_grad_(), pos, mask)
        y.float().square().sum().backward()
        dense = [tuple(t.shape) for t in saved if not is_nf4(t) and t.is_floating_point() and tuple(t.shape) in shapes]
        assert saved, name
        assert not dense, (name, dense)


def test_chunked_dequantize_is_torchaos_bitwise(monkeypatch):
    """models.quant.dequantize (the op's, a chunk at a time) gives torchao's dequantized weight bit for
    bit, chunk boundaries included (chunks of 5 blocks here), for bf16, fp16 and fp32 weights."""
    import models.quant as Q

    monkeypatch.setattr(Q, "DEQUANT_CHUNK", 5 * Q.BLOCK)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q = Q._torchao_nf4()[1](torch.randn(96, 128, generator=g).to(dtype), *Q.nf4_layout(96 * 128))
        w = Q.dequantize(q.quantized_data, q.quantized_scalers, q.quantization_factor, q.scaler_mean, q.nf4,
                         list(q.shape), q.dtype, q.block_size, q.scaler_block_size)
        assert w.dtype == dtype and torch.equal(w, q.to(dtype)), dtype


def test_dry_run_weights_equal_the_module_storage():
    """One stage holding the whole tiny model: the plan's weight bytes are the module's own bytes
    (bf16 parameters incl. adapters + NF4 storage), and nf4 takes less than the bf16 base."""
    from engine.plan import Setup, estimate, layer_costs

    fam, args, spec, model = _tiny()
    _quantize(fam, args, spec, model)
    real = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(storage_nbytes(m.weight) for m in _block_weights(model).values())
    stages = {}
    for quant in ("none", "nf4"):
        setup = Setup(lora=spec, base_quant=quant, gpu=False, dtype="bf16", zero=1)
        costs = layer_costs(fam, args, setup)
        stages[quant] = estimate(costs, [len(costs)], setup)[0]
    assert stages["nf4"].weights == real
    assert stages["nf4"].weights < stages["none"].weights
    assert stages["nf4"].optimizer == stages["none"].optimizer and stages["nf4"].grads == stages["none"].grads
    # the peak holds the largest 4-bit weight's transient dequantized copy (+ one step's buffers), nothing per block
    from engine.plan import dequant_bytes
    largest = max(m.weight.numel() for m in _block_weights(model).values())
    from models.quant import DEQUANT_CHUNK_BYTES
    assert stages["nf4"].extra["dequant"] == dequant_bytes(largest, 2) == largest * (2 + DEQUANT_CHUNK_BYTES)
    assert stages["none"].extra["dequant"] == 0


def nf4_config(tiny_pp, save, **over):
    """test_lora's pp=2 bf16 LoRA run (12 steps), its base in NF4."""
    raw = lora_config(tiny_pp, save, **over)
    raw["lora"] = NF4_LORA
    return raw


def _cfg(**over):
    raw = {"model_path": "m", "data_path": "d.jsonl", "save_path": "s", "lora": {"r": 8, "base_quant": "nf4"},
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and k in raw else v
    return raw


@pytest.mark.parametrize("over, message", [
    ({"lora": {"base_quant": "int4"}}, "lora.base_quant must be none or nf4, got 'int4'"),
    ({"lora": {"base_quant": "nf_4"}}, "got 'nf_4' (did you mean 'nf4'?)"),
    ({"lora": {"r": 0}}, "lora.base_quant: nf4 quantizes the frozen base of a LoRA run; set lora.r > 0"),
    ({"fp8": "tensorwise", "bf16": {"enabled": True}}, "lora.base_quant: nf4 with fp8: tensorwise"),
    ({"lora": {"use_dora": True}}, "lora.use_dora with lora.base_quant"),
])
def test_bad_base_quant_is_one_line(over, message):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(_cfg(**over), "x.yml"), 2, 6)
    assert str(e.value).startswith("x.yml: ") and message in str(e.value) and "\n" not in str(e.value)


def test_zero3_is_refused_by_the_dry_run(tiny_pp, tmp_path, capsys):
    from tests.conftest import run_main
    from train_ds_zero import main

    cfg = tmp_path / "z3.yml"
    import yaml
    raw = config(tiny_pp, tmp_path / "run", dims=(1, 2), parts=None, lora=NF4_LORA, zero_optimization={"stage": 3})
    cfg.write_text(yaml.safe_dump(raw))
    code, out, err = run_main(main, ["--config", str(cfg), "--dry-run", "--world-size", "2"], capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("error: ") and "lora.base_quant: nf4 with ZeRO-3" in err


def _nf4_run_and_bf16_run(raw_bf16, raw_nf4):
    """On this rank: the bf16-base LoRA run's losses, then the nf4-base run's, with what its engine
    holds after training: 4-bit weights, parameters, optimizer masters, whether any quantized
    weight's full-precision original is still alive, and the stage's bytes vs the dry run's."""
    import deepspeed  # noqa: F401

    import models.quant as Q
    from engine.config import from_dict
    from engine.plan import Setup, estimate, layer_costs
    from engine.model import Model
    from engine.training import backends, loop

    bf16 = loop.train(from_dict(raw_bf16)).losses
    originals, kept = [], {}
    quantize_linear, build = Q.quantize_linear, backends.PipelineBackend.build

    def watch(linear, *a):
        originals.append(weakref.ref(linear.weight))
        return quantize_linear(linear, *a)

    def keep(self, *a):
        kept["engine"], kept["parts"] = build(self, *a), self.parts
        return kept["engine"]

    Q.quantize_linear, backends.PipelineBackend.build = watch, keep
    try:
        nf4 = loop.train(from_dict(raw_nf4)).losses
    finally:
        Q.quantize_linear, backends.PipelineBackend.build = quantize_linear, build
    engine = kept["engine"]
    module = engine.module
    gc.collect()
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) and Q.is_nf4(m.weight)]
    opt = engine.optimizer
    masters = sum(p.numel() for g in opt.bf16_groups for p in g)
    cfg = from_dict(raw_nf4)
    model = Model.from_dir(cfg.model_path)
    setup = Setup.from_config(cfg, gpu=False)
    stage = estimate(layer_costs(model.family, model.args, setup), kept["parts"], setup)[engine.stage_id]
    return {"bf16": bf16, "nf4": nf4, "n_nf4": len(linears), "n_quantized": len(originals),
            "alive": sum(r() is not None for r in originals),
            "nf4_params": sum(Q.is_nf4(p) for p in module.parameters()),
            "frozen_dtypes": {str(p.dtype) for p in module.parameters() if not p.requires_grad},
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad), "masters": masters,
            "bytes": sum(p.numel() * p.element_size() for p in module.parameters())
            + sum(Q.storage_nbytes(m.weight) for m in linears),
            "planned": stage.weights}


@pytest.fixture(scope="module")
def nf4_run(tiny_pp, tmp_path_factory):
    """pp=2 bf16, 12 steps: the bf16-base LoRA run and the same run on the nf4 base (one process group)."""
    from tests.dist import run_ranks

    root = tmp_path_factory.mktemp("qlora")
    bf16, nf4 = lora_config(tiny_pp, root / "bf16"), nf4_config(tiny_pp, root / "nf4")
    ranks = run_ranks(_nf4_run_and_bf16_run, 2, bf16, nf4)
    assert ranks[0]["nf4"] == ranks[1]["nf4"] and ranks[0]["bf16"] == ranks[1]["bf16"]
    return root / "nf4", ranks


def test_pp2_nf4_base_trains_near_the_bf16_base_with_only_4bit_block_weights(nf4_run):
    save, ranks = nf4_run
    bf16, nf4 = ranks[0]["bf16"], ranks[0]["nf4"]
    assert sorted(nf4) == list(range(1, 13))
    diffs = [abs(nf4[s] - bf16[s]) for s in nf4]
    assert 0 < diffs[0] < STEP1_TOL and sum(diffs) / len(diffs) < MEAN_TOL and max(diffs) < MAX_TOL, (nf4, bf16)
    assert sum(nf4[s] for s in (10, 11, 12)) < sum(nf4[s] for s in (1, 2, 3)) - 0.15, nf4  # and it learns
    for r in ranks:  # parts (3, 3): 2 blocks per stage, 4 linears each, all quantized, nothing else kept
        assert r["n_nf4"] == r["n_quantized"] == 8 and r["alive"] == 0 and r["nf4_params"] == 0
        assert r["frozen_dtypes"] == {"torch.bfloat16"} and r["masters"] == r["trainable"] > 0
        assert r["bytes"] == r["planned"]  # the dry run's weights are this stage's real bytes
    tag = save / "global_step12"
    files = list(tag.glob("layer_*-model_states.pt"))
    assert len(files) == 4 and all(".lora_" in k for f in files for k in torch.load(f, weights_only=True))
    assert json.loads((tag / "meta.json").read_text())["lora"]["r"] == 4


def test_launcher_stop_resume_bitwise_and_exports_load_on_the_full_precision_base(tiny_pp, nf4_run, tmp_path, capsys):
    """The real launcher: steps 1-6, then the same config to 12 resumes (the base re-quantized from
    model_path, the adapters from the tag) and gives the uninterrupted nf4 run's losses bitwise. The
    adapter export loads in PeftModel on the full-precision HF base and equals the merged export
    (merged into the unquantized base)."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from convert_model import main as convert
    from tests.conftest import run_main
    from tests.test_kill_resume import launch, losses, wait_group

    save, log, cfg = tmp_path / "run", tmp_path / "log", tmp_path / "run.yml"
    for steps in (6, 12):
        cfg.write_text(yaml.safe_dump({**nf4_config(tiny_pp, save), "max_steps": steps}))
        assert wait_group(launch(cfg, log)) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resumed at step 6" in text and "block linears in NF4" in text, text[-3000:]
    assert dict(losses(save)) == nf4_run[1][0]["nf4"]  # every step, bitwise

    assert run_main(convert, ["pp_to_hg", "--input-path", str(save), "--lora-adapter", str(tmp_path / "adapter")],
                    capsys)[0] == 0
    assert run_main(convert, ["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "merged"),
                              "--merge-lora", "--dtype", "float32"], capsys)[0] == 0
    hf = tiny_pp.parent / "hf"
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        plain = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(input_ids=ids).logits
    assert (peft - plain).abs().max() > 1e-3  # the trained adapters change the output
    torch.testing.assert_close(merged, peft, atol=1e-5, rtol=0)


def _zero_nf4(raw):
    import deepspeed  # noqa: F401

    import models.quant as Q
    from engine.training import backends, loop

    kept, build = {}, backends.ZeroBackend.build

    def keep(self, *a):
        kept["engine"] = build(self, *a)
        return kept["engine"]

    backends.ZeroBackend.build = keep
    try:
        losses = loop.train_zero(from_dict(raw)).losses
    finally:
        backends.ZeroBackend.build = build
    module = kept["engine"].module
    return losses, sum(Q.is_nf4(m.weight) for m in module.modules() if isinstance(m, nn.Linear)), \
        sum(Q.is_nf4(p) for p in module.parameters()), sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_zero2_nf4_base_matches_the_pipeline_nf4_run(tiny_pp, nf4_run, tmp_path):
    """train_ds_zero.py, ZeRO-2 over 2 ranks: the same 4-bit base and adapters as the pp=2 run, so
    the same losses up to bf16 summation order; all 16 block linears 4-bit, none a parameter."""
    from tests.dist import run_ranks

    raw = {**nf4_config(tiny_pp, tmp_path / "z2", zero_optimization={"stage": 2}), "max_steps": 3}
    raw["model_topo"] = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}, "parts": "auto"}
    ranks = run_ranks(_zero_nf4, 2, raw)
    pp = nf4_run[1][0]["nf4"]
    for losses, n_nf4, nf4_params, trainable in ranks:
        assert n_nf4 == 16 and nf4_params == 0 and trainable == ranks[0][3] > 0
        assert sorted(losses) == [1, 2, 3] and all(abs(losses[s] - pp[s]) < 2e-2 for s in losses), (losses, pp)
