"""Text generation with a trained model: loading, device placement, sampling, streaming.

One sampling loop serves every source. A *language model* here is anything with
`reset()` and `next_logits(new_ids) -> logits[vocab]` (fed the prompt first, then one token
at a time):

  OurLM   our own `SequentialModel`, loaded layer file by layer file from a pipeline checkpoint
          dir (<dir>/latest + layer files + <dir>/hf) or from an HF dir (key map of the family),
          its contiguous layers placed on one or several devices (activations move between
          them). KV cache: each block's attention keeps its keys/values (models.kv_cache.KVCache,
          on that block's device), so a step runs only the new token through the layers, and
          only the last position through the head. On one CUDA device the cache is static
          (StaticKVCache) and a token is one replay of a captured CUDA graph (OurLM).
  HFLM    transformers' AutoModelForCausalLM on an HF dir (our pp_to_hg output), with its KV
          cache; one device.

Prompts are rendered by data.templates (the training templates) and tokenized by
data.tokenize.encode_prompt (the training BOS rule), so the model sees at generation time
exactly the text layout it was trained on.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data.templates import ACTION_RESULT, parse_api_call

from engine import fault_hooks
from engine.checkpoints.files import LayoutError, locate

API_STOP = "Observation:"  # an api call ends here: the tool, not the model, writes the result


# ----------------------------------------------------------------------------- sampling
@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    do_sample: bool = False  # False: greedy (argmax)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or answer
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop after text ending with one of these (kept in the answer)
    stop_ids: tuple[int, ...] = ()  # tokens that end the answer like EOS (a chat template's end-of-turn)


def process_logits(logits: torch.Tensor, seen: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """Repetition penalty, then (when sampling) temperature, top-k and top-p, as transformers does."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        picked = logits[idx]
        logits[idx] = torch.where(picked < 0, picked * cfg.repetition_penalty, picked / cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits
    if cfg.temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling (use greedy decoding instead)")
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def pick_token(logits: torch.Tensor, seen: list[int], cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    scores = process_logits(logits, seen, cfg)
    if not cfg.do_sample:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Generation:
    ids: list[int] = field(default_factory=list)  # generated token ids (EOS excluded)
    text: str = ""
    stop_reason: str = "length"  # eos | stop | length


class TextStream:
    """Incremental detokenization: text of the ids so far, emitted as it becomes stable.

    Decoding the whole answer each step (not token by token) keeps sentencepiece's spaces and
    multi-byte characters right; a trailing U+FFFD (half a UTF-8 character) is held back.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new


@torch.no_grad()
def generate(lm, tokenizer, prompt_ids: list[int], cfg: SamplingConfig,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Sample up to cfg.max_new_tokens after prompt_ids; stream text pieces to on_text."""
    generator = None
    if cfg.do_sample:
        generator = torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    eos = ({tokenizer.eos_token_id} | set(cfg.stop_ids)) - {None}
    lm.reset()
    if hasattr(lm, "reserve"):  # OurLM's static cache: room for the whole generation up front
        lm.reserve(len(prompt_ids) + cfg.max_new_tokens)
    logits = lm.next_logits(list(prompt_ids))
    seen, out, stream = list(prompt_ids), Generation(), TextStream(tokenizer)
    emit = on_text or (lambda _: None)
    for _ in range(cfg.max_new_tokens):
        token = pick_token(logits, seen, cfg, generator)
        if token in eos:
            out.stop_reason = "eos"
            break
        out.ids.append(token)
        seen.append(token)
        piece = stream.push(token)
        if piece:
            emit(piece)
            fault_hooks.hold_answer(len(out.ids))
        if cfg.stop and any(stream.emitted.endswith(s) for s in cfg.stop):
            out.stop_reason = "stop"
            break
        if len(out.ids) == cfg.max_new_tokens:
            break
        logits = lm.next_logits([token])
    rest = stream.flush()
    if rest:
        emit(rest)
    out.text = stream.emitted
    return out


# ----------------------------------------------------------------------------- device placement
def plan_devices(layer_bytes: list[int], devices: list[str]) -> list[str]:
    """Contiguous split of layers over devices, balanced by parameter bytes.

    Layer i goes to the device whose equal share of the cumulative byte range holds the middle
    of layer i, subject to: device indices never decrease along the layers (activations only
    move forward), none is skipped, and with at least as many layers as devices every device
    gets a layer. `devices` may repeat a name (tests split over "cpu", "cpu").
    """
    if not devices:
        raise ValueError("no devices given")
    n, n_layers, total = len(devices), len(layer_bytes), float(sum(layer_bytes)) or 1.0
    plan, cum = [], 0.0
    for i, b in enumerate(layer_bytes):
        k = min(n - 1, int(n * (cum + b / 2) / total))
        if plan:
            k = min(max(k, plan[-1]), plan[-1] + 1)  # monotone, no device skipped
        else:
            k = 0
        if n_layers >= n:
            k = max(k, n - (n_layers - i))  # enough layers left for the later devices
        plan.append(min(k, n - 1))
        cum += b
    return [devices[k] for k in plan]


def move(x, device):
    """Tensors in (nested) tuples/lists/dicts moved to device; everything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: move(v, device) for k, v in x.items()}
    return x


def default_devices() -> list[str]:
    """All GPUs this process may use (the deepspeed launcher shows each rank every local GPU),
    else the CPU."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, devices: list[str]) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if any(d.startswith("cuda") for d in devices) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (auto, {', '.join(DTYPES)})")
    return DTYPES[name]


# ----------------------------------------------------------------------------- our model
class OurLM:
    """models.pipeline.SequentialModel with its layers placed on `devices`, with a KV cache.

    Two cache paths. Eager (the reference; CPU default): KVCache buffers grow as tokens come,
    every step runs the layers from Python. Static (`static=True`): StaticKVCache buffers sized
    for the whole generation (capacity rounded up to CAPACITY_STEP, capped by the model's
    positions) and a decode step with static shapes (models.kv_cache.DecodeCursor); with `graphs`
    that step is captured once per capacity as a CUDA graph and each token is one replay.
    graphs=None (demo.py's `--cuda-graphs auto`, the default): on when the layers sit on one CUDA
    device and the model has no MoE routing (its expert dispatch has data-dependent shapes); False
    (`--cuda-graphs off`): the eager path. Measured on one H200 (bench/bench_generate.py): 3.73x
    transformers' tokens/s, argmax equal to eager at 32/32 teacher-forced steps. Layers split over
    several devices keep the eager path (no graph per device segment is built; static=True runs
    the static step there eagerly).
    Greedy tokens are the same on every path (reduction order aside).
    """

    CAPACITY_STEP = 256  # a chat whose history grows re-captures once per 256 tokens at most

    def __init__(self, model, layer_devices: list[torch.device], hf_dir: Path, family, args,
                 static: bool | None = None, graphs: bool | None = None):
        from models.pipeline import layer_groups

        self.model, self.layer_devices = model, layer_devices
        self.hf_dir, self.family, self.args = hf_dir, family, args
        self.head_start = len(model.defs) - len(layer_groups(family, args)[-1])  # final norm + head from here
        self.ids: list[int] = []
        self.caches: list = []
        self.step: dict = {}  # the caches' per-step memo (models.positions.Rotary's tables), cleared by _layers
        if graphs is None:
            graphs = self.graphs_possible()
        elif graphs and not self.graphs_possible():
            raise ValueError("CUDA graphs need every layer on one CUDA device and no MoE routing")
        self.graphs = graphs
        self.static = graphs if static is None else static
        if graphs and not self.static:
            raise ValueError("CUDA graphs replay the static-cache decode step (static=True)")
        self.cursor = None  # models.kv_cache.DecodeCursor of the static caches
        self.graph = None  # (CUDAGraph, its static logits) for the cursor's capacity
        # the captured step is first compiled whole by inductor (norms, rotary, SiLU*up and residual
        # adds fused: about half the kernels of the eager step, which on a GPU are what a decode step
        # waits on besides reading the weights); rope families only: ALiBi's slopes are CPU constants,
        # whose copy inside a compiled graph could not be captured
        self.compile_step = graphs and self.family.dims(self.args).positional == "rope"
        self._compiled = None
        self.reserved = 0
        self._token = None  # [1, 1] int64 on the first device: the decode step's input token

    def graphs_possible(self) -> bool:
        devices = set(self.layer_devices)
        return (len(devices) == 1 and next(iter(devices)).type == "cuda"
                and not self.family.dims(self.args).experts)

    @property
    def first_device(self) -> torch.device:
        return self.layer_devices[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] of SequentialModel.forward, layer by layer on each layer's device (no cache)."""
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        x = (input_ids, position_ids)
        for i, d in enumerate(self.model.defs):
            layer = self.model._modules[str(i)]
            x = move(x, self.layer_devices[i])
            x = d.forward_fn(layer, x) if d.forward_fn is not None else layer(x)
        return x[0] if isinstance(x, tuple) else x  # an MoE head also returns its aux loss

    @property
    def max_len(self) -> int | None:
        return self.family.dims(self.args).max_positions

    def reset(self) -> None:
        """Forget the tokens fed so far. Static buffers (and the captured graph) are kept for the
        next generation: only the cursor goes back to 0."""
        from models.block_base import BlockBase
        from models.kv_cache import KVCache, StaticKVCache

        self.ids, self.reserved = [], 0
        if self.static and self.cursor is not None:
            self.cursor.length = 0
            return
        if self.static:
            from models.kv_cache import DecodeCursor

            self.cursor = DecodeCursor(0)  # sized by the first next_logits
        blocks = [isinstance(self.model._modules[str(i)], BlockBase) for i in range(len(self.model.defs))]
        self.caches = [(StaticKVCache(self.cursor, self.step) if self.static else KVCache(self.step)) if b else None
                       for b in blocks]

    def reserve(self, n_tokens: int) -> None:
        """This generation will hold up to n_tokens (prompt + new tokens): size the static buffers
        for it up front rather than grow them (and re-capture) halfway."""
        self.reserved = n_tokens

    def _ensure_capacity(self, need: int) -> None:
        cursor = self.cursor
        need = max(need, self.reserved)
        if need <= cursor.capacity:
            return
        want = -(-need // self.CAPACITY_STEP) * self.CAPACITY_STEP
        if self.compile_step:  # each capacity is a compile: double it (a few per process) rather than add 256
            want = max(want, 2 * cursor.capacity)
        if self.max_len:
            want = min(want, max(self.max_len, need))
        cursor.capacity = want  # the caches grow their buffers at their next write
        self.graph = None  # captured for the old buffers; dropped before the new ones exist

    @torch.no_grad()  # also when called outside generate(): nothing to record for autograd in a capture
    def next_logits(self, new_ids: list[int]) -> torch.Tensor:
        """Logits after `new_ids`, which follow the tokens fed since reset() (whose keys and
        values the caches hold)."""
        if not self.caches:
            self.reset()
        start = len(self.ids)
        self.ids += new_ids
        if self.static:
            self._ensure_capacity(len(self.ids))
            if len(new_ids) == 1 and start > 0:
                return self._decode(new_ids[0], start)
            self.cursor.length, self.cursor.decoding = start, False
        x = (torch.tensor([new_ids], dtype=torch.long), torch.arange(start, len(self.ids))[None])
        return self._layers(x)[0, -1].float().cpu()

    def _layers(self, x) -> torch.Tensor:
        """Every layer with its cache; logits [B, 1, V] of the last position."""
        self.step.clear()  # tables of the previous step hold its positions (static: the same tensor, refilled)
        here = None
        for i, d in enumerate(self.model.defs):
            layer = self.model._modules[str(i)]
            if self.layer_devices[i] != here:  # activations move only where the device changes
                here = self.layer_devices[i]
                x = move(x, here)
            if i == self.head_start:  # only the last position's logits are wanted
                x = (x[0][:, -1:],) + tuple(x[1:])
            if self.caches[i] is not None:
                x = layer(x, cache=self.caches[i])
            else:
                x = d.forward_fn(layer, x) if d.forward_fn is not None else layer(x)
        return x[0] if isinstance(x, tuple) else x

    def _decode(self, token: int, position: int) -> torch.Tensor:
        """One token at `position` through the static step: eager, or a replay of its graph."""
        cursor, device = self.cursor, self.first_device
        cursor.decoding = True
        cursor.pos(device)  # created before set_position fills it, so never created inside a capture
        if self._token is None:
            self._token = torch.zeros(1, 1, dtype=torch.long, device=device)
        cursor.set_position(position)
        self._token.fill_(token)
        if not self.graphs:
            return self._step()[0, -1].float().cpu()
        with torch.cuda.device(device):  # capture and replay on the layers' device, not cuda:0's
            if self.graph is None:
                self.graph = self._capture()
            graph, logits = self.graph
            graph.replay()
        return logits[0, -1].float().cpu()  # the one host sync per token

    def _step(self) -> torch.Tensor:
        """The decode step (what the graph captures): static inputs self._token and the cursor's
        position, static buffers, no host reads."""
        return self._layers((self._token, self.cursor.pos(self.first_device)))

    def _capture(self):
        """One eager step on the current stream (buffers grown to a new capacity are allocated on
        the stream that uses them), warm-up on a side stream (lazy inits; as PyTorch's CUDA-graph
        docs say), then capture. Each run writes the same key/value at the same position, so these
        runs change nothing the replay would not write again."""
        if self.compile_step and self._compiled is None:  # a new capacity recompiles (shapes are static)
            self._compiled = torch.compile(self._step, dynamic=False)
        step = self._compiled or self._step
        step()  # compiles before any capture
        stream = torch.cuda.Stream(self.first_device)
        stream.wait_stream(torch.cuda.current_stream(self.first_device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.first_device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        return graph, logits


def load_ours(path: str | Path, devices: list[str] | None = None, dtype: str = "auto",
              tag: str | None = None, static: bool | None = None, graphs: bool | None = None,
              adapter: str | Path | None = None) -> OurLM:
    """Our SequentialModel from a pipeline checkpoint dir or an HF dir, split over `devices`
    (static, graphs: OurLM's cache paths).

    Layers are built one at a time directly on their device and loaded from their own layer
    file (memory-mapped), so no process ever holds the whole model on one device or in RAM.
    A LoRA run's dir: its base model with the adapters beside the frozen weights (not merged).
    `adapter` (a PEFT adapter dir or a LoRA run): its adapters on the model of `path` (a pipeline or
    HF dir; a LoRA run there is its base with its adapters merged), beside the weights.
    """
    from models.block_base import LayerOptions
    from models.lora import add_lora
    from models.pipeline import SequentialModel

    from engine.checkpoints.files import resolve_tag
    from engine.checkpoints.lora import Adapters, of_tag, open_adapter
    from engine.checkpoints.weights import open_weights

    if adapter is not None:
        source = open_weights(path, tag=tag)
        lora = open_adapter(adapter, source.model, "--adapter")
    else:
        lora = Adapters(path, tag) if (Path(path) / "latest").exists() and of_tag(resolve_tag(path, tag)) else None
        source = open_weights(lora.base_dir(), lora.model) if lora else open_weights(path, tag=tag)
    family, args, hf_dir = source.model.family, source.model.args, source.where.hf_dir
    devices = devices or default_devices()
    torch_dtype = resolve_dtype(dtype, devices)
    layer_bytes = [sum(math.prod(s) for s in layer.values()) for layer in source.shapes]
    plan = plan_devices(layer_bytes, devices)
    with torch.device("meta"):
        model = SequentialModel(family, args)  # structure and names only; layers replaced below
    shared: dict[str, torch.nn.Module] = {}
    layer_devices = []
    for i, d in enumerate(model.defs):
        if d.tie is not None and d.tie in shared:
            layer = shared[d.tie]
        else:
            with torch.device(plan[i]):
                layer = d.cls(args, LayerOptions())
            layer.load_state_dict(source.layer(i))
            if lora is not None:
                add_lora([(i, layer)], family, args, lora.spec, seed=0)
                trained, params = lora.layer(i), dict(layer.named_parameters())
                with torch.no_grad():
                    for name, t in trained.items():
                        params[name].copy_(t)
            layer.to(torch_dtype)
            if d.tie is not None:
                shared[d.tie] = layer
        model._modules[str(i)] = layer
        layer_devices.append(next(layer.parameters()).device)
    model.eval()
    return OurLM(model, layer_devices, hf_dir, family, args, static, graphs)


# ----------------------------------------------------------------------------- transformers
class HFLM:
    """transformers' model on an HF dir, with its KV cache."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "auto"):
        from transformers import AutoModelForCausalLM

        self.hf_dir = Path(path)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, [device]),
                                                          trust_remote_code=True).to(self.device).eval()
        self.past = None
        # transformers >= 5.2x names the KV cache `cache` (argument and output field) and deprecates
        # `past_key_values`, which older releases in our range still use
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @property
    def max_len(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def reset(self) -> None:
        self.past = None

    def next_logits(self, new_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **{self.cache_name: self.past})
        self.past = out["cache" if "cache" in out.keys() else "past_key_values"]
        return out.logits[0, -1].float().cpu()


def load_lm(path: str | Path, backend: str = "ours", devices: list[str] | None = None, dtype: str = "auto",
            graphs: bool | None = None, adapter: str | Path | None = None):
    """A language model for `generate` from a pipeline checkpoint dir or an HF dir (graphs: OurLM's;
    the hf backend has no graph path), with `adapter` (a PEFT adapter dir or, backend ours, a LoRA
    run) on it. A PEFT adapter dir as `path`: that adapter on the base it names."""
    from engine.checkpoints.hub import model_source
    from engine.checkpoints.files import read_json
    from engine.checkpoints.lora import ADAPTER_CONFIG, is_peft_dir, peft_base, peft_spec

    if adapter is None and is_peft_dir(path):
        adapter, path = path, model_source(peft_base(path))
    if backend == "hf":
        if not locate(path).is_hf:
            raise LayoutError(f"{path}: backend 'hf' needs an HF dir (convert with pp_to_hg, or use backend 'ours')")
        lm = HFLM(path, (devices or default_devices())[0], dtype)
        if adapter is not None:  # peft's own PeftModel on transformers' model; its config read strictly first
            from peft import PeftModel

            if not is_peft_dir(adapter):
                raise LayoutError(f"{adapter}: --backend hf takes a PEFT adapter dir (no {ADAPTER_CONFIG}); a LoRA run "
                                  "needs --backend ours, or export it with pp_to_hg --lora-adapter")
            peft_spec(Path(adapter) / ADAPTER_CONFIG, read_json(Path(adapter) / ADAPTER_CONFIG, "PEFT adapter config"))
            lm.model = PeftModel.from_pretrained(lm.model, adapter).to(lm.device).eval()
        return lm
    if backend != "ours":
        raise ValueError(f"unknown backend {backend!r} (ours, hf)")
    return load_ours(path, devices, dtype, graphs=graphs, adapter=adapter)



def load_tokenizer(lm):
    from engine.model import load_tokenizer as load  # a damaged tokenizer file is one error line

    return load(lm.hf_dir)


# ----------------------------------------------------------------------------- prompts
def prompt_ids(sample, tokenizer, template: str = "default", pending: list[tuple[str, str]] = ()) -> list[int]:
    """Training-template prompt of a sample in prompt form (dict or record), as token ids;
    pending: the api calls made so far in this answer, with their results (data.templates.render_prompt)."""
    from data.tokenize import prompt_token_ids

    return prompt_token_ids(sample, tokenizer, template, pending)


def stop_token_ids(tokenizer, template: str = "default", hf_dir: str | Path | None = None) -> tuple[int, ...]:
    """Tokens besides the tokenizer's EOS that end an answer: the chat template's end-of-turn
    token when prompts go through it (SmolLM2's <|im_end|>, Llama-3's <|eot_id|>), and the
    model's generation_config.json eos_token_id(s), which transformers' generate stops at too."""
    from data.templates import chat_style, resolve_template
    from engine.checkpoints.files import LayoutError, read_json

    ids = set()
    if resolve_template(template, tokenizer) == "chat_template" and chat_style(tokenizer).eot_token:
        ids.add(tokenizer.convert_tokens_to_ids(chat_style(tokenizer).eot_token))
    gen_config = Path(hf_dir) / "generation_config.json" if hf_dir else None
    if gen_config and gen_config.is_file():  # the model dir's file: damaged is one line naming it
        eos = read_json(gen_config, "generation config").get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos if i is not None):
            raise LayoutError(f"{gen_config}: eos_token_id must be a token id or a list of them, got {eos}")
        ids |= set(eos) - {None}
    return tuple(sorted(ids))


# ----------------------------------------------------------------------------- chat sessions
KINDS = ("conversation", "instruct", "ref_qa", "conver_has_api", "pretrain")


class Chat:
    """One user's session: history of rounds rendered with the training template every turn.

    kind: conversation (with history), instruct (each prompt alone), ref_qa (history + a
    reference), conver_has_api (history + an api description; the model's api call stops at
    "Observation:", or at its end of turn under a chat template, and `observe(answer_so_far)`
    supplies the tool's result, which enters the prompt as training laid it out: after the call,
    or as a tool message), pretrain (plain continuation of the text). system: a system prompt.
    """

    def __init__(self, lm, tokenizer, kind: str = "conversation", sampling: SamplingConfig | None = None,
                 template: str = "default", reference: str | None = None, api_desc: str | None = None,
                 max_len: int | None = None, system: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown prompt type {kind!r} (expected one of {', '.join(KINDS)})")
        if kind == "ref_qa" and not reference:
            raise ValueError("type ref_qa needs a reference (--reference)")
        if kind == "conver_has_api" and not api_desc:
            raise ValueError("type conver_has_api needs an api description (--api-desc)")
        self.lm, self.tokenizer, self.kind, self.template = lm, tokenizer, kind, template
        self.sampling = sampling or SamplingConfig()
        self.reference, self.api_desc, self.max_len, self.system = reference, api_desc, max_len, system
        self.rounds: list[list] = []
        self.stop_ids = stop_token_ids(tokenizer, template, getattr(lm, "hf_dir", None))

    def reset(self) -> None:
        self.rounds = []

    def sample(self, rounds: list[list]) -> dict:
        last = rounds[-1][1]
        if self.kind == "instruct":
            return {"type": "instruct", "instruct": last, **({"system": self.system} if self.system else {})}
        if self.kind == "pretrain":
            return {"type": "pretrain", "text": last}
        sample = {"type": self.kind, "rounds": rounds}
        if self.kind == "ref_qa":
            sample["reference"] = self.reference
        if self.kind == "conver_has_api":
            sample["api_desc"] = self.api_desc
        if self.system:
            sample["system"] = self.system
        return sample

    def ask(self, text: str, on_text: Callable[[str], None] | None = None,
            observe: Callable[[str], str | None] | None = None) -> Generation:
        """The model's answer to `text` given the history (streamed to on_text); history grows."""
        history = self.rounds if self.kind in ("conversation", "ref_qa", "conver_has_api") else []
        rounds = history + [["ask", text]]
        ids = prompt_ids(self.sample(rounds), self.tokenizer, self.template)
        budget = self.sampling.max_new_tokens
        while self.max_len and len(ids) + budget > self.max_len and len(rounds) > 2:
            rounds = rounds[2:]  # forget the oldest exchange rather than overflow the positions
            ids = prompt_ids(self.sample(rounds), self.tokenizer, self.template)
        api = self.kind == "conver_has_api"
        cfg = SamplingConfig(**{**self.sampling.__dict__, "stop": (API_STOP,) if api else (), "stop_ids": self.stop_ids})
        total = Generation(stop_reason="length")
        pending: list[tuple[str, str]] = []  # (call the model wrote, the tool's result) within this answer
        while budget > 0:
            cfg.max_new_tokens = budget
            g = generate(self.lm, self.tokenizer, ids, cfg, on_text)
            total.ids += g.ids
            total.text += g.text
            total.stop_reason = g.stop_reason
            budget -= len(g.ids)
            is_call = api and (g.stop_reason == "stop" or g.stop_reason == "eos" and parse_api_call(g.text) is not None)
            result = observe(total.text) if (is_call and observe) else None
            if result is None:
                break
            pending.append((g.text, result))
            piece = ACTION_RESULT.format(api_res=result)  # shown as the default layout has it
            if on_text:
                on_text(piece)
            total.text += piece
            ids = prompt_ids(self.sample(rounds), self.tokenizer, self.template, pending)
        if history is self.rounds and total.text.strip():
            self.rounds = rounds + [self._answer_round(pending, g.text, total.text)]
        return total

    def _answer_round(self, pending: list[tuple[str, str]], final: str, text: str) -> list:
        """The answer as a history round: in the plain layout the text the model saw as is; under
        a chat template, calls and results as training renders an ans-api (assistant and tool
        messages) when every call parses."""
        from data.templates import resolve_template

        calls = [parse_api_call(call) for call, _ in pending]
        final = final.strip().removeprefix("Final Answer:").strip()
        template = resolve_template(self.template, self.tokenizer)
        if template == "gdgpt" and not pending:
            return ["ans", text.removesuffix(" ")]  # its layout writes "{ans} </s>": the space is the layout's
        if not pending or template not in ("chat_template", "gdgpt") or None in calls or not final:
            return ["ans", text]
        return ["ans-api", {"actions": [{**c, "api_res": res} for c, (_, res) in zip(calls, pending)], "ans": final}]


def read_prompts(path: str | Path, default_kind: str = "instruct") -> list:
    """Prompts from a JSONL file or a JSON array: sample dicts in prompt form, or plain strings
    (taken as `default_kind` with that text)."""
    from data.reader import read_records

    out = []
    for _, item in read_records(str(path)):  # the training data's reader: UTF-8 (BOM ok), errors name the line
        if isinstance(item, Exception):
            raise item
        if isinstance(item, str):
            item = ({"type": "instruct", "instruct": item} if default_kind == "instruct" else
                    {"type": "pretrain", "text": item} if default_kind == "pretrain" else
                    {"type": default_kind, "rounds": [["ask", item]]})
        out.append(item)
    return out


def answer_file(lm, tokenizer, prompts_path: str | Path, out_path: str | Path, sampling: SamplingConfig,
                template: str = "default", default_kind: str = "instruct", log=None) -> int:
    """Answer every prompt of a file, one JSON line each: {index, prompt, answer, n_tokens, stop_reason}.

    Prompts are run one after another (no padding: each sees exactly its own training-layout
    prompt). An api call stops at "Observation:" (there is no tool to call in batch mode).
    """
    import json

    from data.samples import parse_sample

    prompts = read_prompts(prompts_path, default_kind)
    for i, p in enumerate(prompts):  # validate all before generating anything
        parse_sample(p, str(prompts_path), i, for_prompt=True)
    stop_ids = stop_token_ids(tokenizer, template, getattr(lm, "hf_dir", None))
    with open(out_path, "w") as fh:
        for i, p in enumerate(prompts):
            stop = (API_STOP,) if p.get("type") == "conver_has_api" else ()
            cfg = SamplingConfig(**{**sampling.__dict__, "stop": stop, "stop_ids": stop_ids})
            g = generate(lm, tokenizer, prompt_ids(p, tokenizer, template), cfg)
            fh.write(json.dumps({"index": i, "prompt": p, "answer": g.text, "n_tokens": len(g.ids),
                                 "stop_reason": g.stop_reason}, ensure_ascii=False) + "\n")
            fh.flush()
            if log:
                log(f"[{i + 1}/{len(prompts)}] {len(g.ids)} tokens ({g.stop_reason})")
    return len(prompts)


HELP = ("commands: /reset clears the history, /quit (or quit, exit, Ctrl-D) leaves, /help shows this; "
        "Ctrl-C stops an answer; anything else is your next message")


def interactive(chat: Chat, read=input, write=None) -> None:
    """A read-answer loop on the terminal; answers stream as they are generated. Ctrl-C stops the
    answer being written (that exchange is not kept in the history) and returns to the prompt; an
    answer cut by max_new_tokens is marked."""
    import sys

    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    write(f"{chat.kind} mode; {HELP}\n")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(Ctrl-D or /quit leaves)\n")
            continue
        g, asked = None, False
        try:  # a Ctrl-C anywhere from here to the next prompt stops this answer, never the session
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit", "quit", "exit"):
                return
            if text == "/reset":
                chat.reset()
                write("(history cleared)\n")
                continue
            if text == "/help":
                write(HELP + "\n")
                continue
            asked = True
            g = chat.ask(text, on_text=write, observe=lambda call: read(" [tool result] ").strip() or None)
            if g.stop_reason == "length":
                write(f" [cut at {chat.sampling.max_new_tokens} new tokens: --max-new-tokens]\n")
            else:
                write("\n" if g.text else "(empty answer)\n")
        except KeyboardInterrupt:  # once ask has returned, the exchange is complete and kept
            write("\n[stopped; this exchange is not kept]\n" if asked and g is None else "\n")
