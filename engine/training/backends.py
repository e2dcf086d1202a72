"""How one global step runs: the two training paths behind engine.training.loop's shared loop.

A backend builds the model + DeepSpeed engine and runs a step over the loader's micro-batches:

    PipelineBackend  PipelineModule split over stages; `engine.train_batch` (train_ds.py)
    ZeroBackend      the whole model as one module (SequentialModel) under ZeRO-1/2/3 with
                     optional CPU offload; forward/backward per micro-batch, `engine.step` does
                     the update at the accumulation boundary (train_ds_zero.py)

Both report the same loss: the mean over micro-batches and data-parallel ranks of the loader's
scaled losses (= sum of answer-token CE / answer tokens of the global batch), and both produce
gradients of exactly that: DeepSpeed divides by gradient_accumulation_steps in backward and
averages over data-parallel ranks (all-reduce / ZeRO reduce-scatter alike).

Checkpoints: both paths write the same tag format (engine/checkpoints/reshape.py): one file per
layer holding its fp32 master weights (layer_XX-model_states.pt) and one with its optimizer state
(optim/layer_XX.pt), ZeRO partitions gathered one parameter at a time. So `convert_model.py
pp_to_hg` exports either path's checkpoints unchanged, no rank ever holds the whole model, and
either path starts from the other's weights (model_path: <the other run's save_path>).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from models.lora import LoraSpec, add_lora, check_spec
from models.sequence_parallel import make_group
from models.pipeline import SequentialModel, build_pipeline, init_layer, init_weights, training_loss

from engine import distributed as D
from engine.config import ConfigError, TrainConfig, validate
from engine.checkpoints.lora import init_adapters, load_adapters
from engine.checkpoints.weights import load_stage, open_weights
from engine.training.optim import GlobalGradClip, build_optimizer, uses_ds_cpu_optimizer
from engine.plan import check_dense_attention, check_seq, resolve_auto_parts
from engine.model import Model
from engine.training.deepspeed_setup import deepspeed_config, layer_options, wrapped_optimizer
from engine.training import grad_accum
from engine.training.qlora import BlockLoader, check_base_quant, quantize_loaded  # noqa: F401 (preflight's)


class PipelineBackend:
    kind = "pipeline"

    def __init__(self, cfg: TrainConfig, model: Model):
        from deepspeed.runtime.pipe.topology import ProcessTopology

        validate(cfg, D.world_size(), model.n_layers)
        self.parts = resolve_auto_parts(cfg, model, self.kind, print if D.rank() == 0 else (lambda _: None))
        # the run's config from here on (checkpoint layout, config.yml): `parts: auto` resolved
        self.cfg = cfg = replace(cfg, model_topo=replace(cfg.model_topo, parts=self.parts))
        self.model = model
        check_seq(cfg, model.family, model.args, gpu=D.on_gpu())
        check_dense_attention(cfg, model.family, model.args, gpu=D.on_gpu())
        topo, n = cfg.model_topo.process_topology, cfg.seq_dim
        # the seq axis folded into DeepSpeed's data axis (innermost): its gradient all-reduce, ZeRO
        # sharding and batch size count data x seq ranks, and stage s's rank (d, r) talks point to point
        # with stage s+1's rank (d, r)
        self.topology = ProcessTopology(axes=topo.axes, dims=topo.dims) if n == 1 else \
            ProcessTopology(axes=["pipe", "data"], dims=[cfg.pipe_dim, cfg.data_dim * n])
        coord = self.topology.get_coord(D.rank()).data
        self.dp_rank, self.dp_size = coord // n, cfg.data_dim
        self.seq_rank, self.seq_size, self.seq = coord % n, n, None
        self.wgrad_fusion = grad_accum.wgrad_fusion(cfg)
        self.lora = lora_spec(cfg, model)

    def describe(self) -> str:
        return f"parts {self.parts}" + (", fp32 grad accumulation fused into the wgrad GEMM" if self.wgrad_fusion else "") \
            + describe_lora(self.lora, self.cfg.lora.base_quant)

    def build(self, weights: str | None, adapters=None):
        """`weights`: a checkpoint/HF dir to load, "scratch" for random init, None (resume fills them).
        LoRA: `weights` is the base; `adapters` a LoRA tag to resume the adapters from (else fresh ones)."""
        import deepspeed

        cfg, model = self.cfg, self.model
        self.seq = make_group(D.world_size(), self.seq_size)  # every rank creates every group
        blocks = BlockLoader(cfg, model, self.lora, weights) if self.lora and cfg.lora.base_quant != "none" else None
        module = build_pipeline(model.family, model.args, layer_options(cfg, seq=self.seq), self.topology, self.parts,
                                cfg.seed, wgrad_fusion=self.wgrad_fusion, on_block=blocks)
        if blocks is not None:  # QLoRA: each block was loaded and quantized as it was built
            blocks.rest(module)
        elif weights == "scratch":
            init_weights(module, cfg.seed)
        elif weights:
            load_stage(module, weights, model)
        if self.lora:
            owned = [(module._local_start + i, f) for i, f in enumerate(module.forward_funcs) if isinstance(f, torch.nn.Module)]
            self.trainable = with_lora(self.lora, owned, model, cfg.seed, adapters)
            freeze_tied_twins(module, self.lora, model, adapters is not None)
        self._pop_metrics = getattr(module.loss_fn, "pop_metrics", None)
        optimizer = build_optimizer(cfg.ds.get("optimizer"), module.named_parameters(), cfg.ds)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(cfg))
        if self.wgrad_fusion:
            grad_accum.link(self.engine)
        self.clip = None if wrapped_optimizer(cfg) else GlobalGradClip(
            optimizer, module, float(cfg.ds.get("gradient_clipping", 0.0)), self.engine.grid.get_model_parallel_group())
        self.loss_owner = module
        return self.engine

    def train_step(self, micro_batches: list) -> float:
        return float(self.engine.train_batch(iter(on_device(micro_batches, self.engine.device))))

    def grad_norm(self) -> float | None:
        return self.clip.norm if self.clip else _grad_norm(self.engine)

    def loss_metrics(self) -> dict:
        """The loss function's own metrics (e.g. MoE aux loss), computed on the last stage: popped
        there, sent to every stage of this pipeline, averaged over the step's micro-batches."""
        import torch.distributed as dist

        if self._pop_metrics is None:
            return {}
        engine = self.engine
        box = [{k: v / self.cfg.grad_accum for k, v in self._pop_metrics().items()} if engine.is_last_stage() else None]
        if engine.is_last_stage():
            box[0] = seq_mean(box[0], self.seq)
        if engine.num_stages > 1:
            src = engine.grid.stage_to_global(engine.num_stages - 1)
            dist.broadcast_object_list(box, src=src, group=engine.grid.get_pipe_parallel_group())
        return box[0]


class ZeroBackend:
    kind = "zero"

    def __init__(self, cfg: TrainConfig, model: Model):
        validate(cfg, D.world_size(), model.n_layers, pipeline=False)
        check_seq(cfg, model.family, model.args, gpu=D.on_gpu())
        check_dense_attention(cfg, model.family, model.args, gpu=D.on_gpu())
        self.cfg, self.model = cfg, model
        n = cfg.seq_dim  # seq ranks innermost: rank d * n + r holds slice r of data rank d's rows
        self.dp_rank, self.dp_size = D.rank() // n, D.world_size() // n
        self.seq_rank, self.seq_size, self.seq = D.rank() % n, n, None
        self.zero = cfg.ds["zero_optimization"]
        self.stage = self.zero["stage"]
        self.lora = lora_spec(cfg, model)

    def describe(self) -> str:
        offload = [f"{k.split('_')[1]}->{v['device']}" for k, v in self.zero.items()
                   if k.startswith("offload_") and (v or {}).get("device", "none") != "none"]
        cpu_opt = ", DeepSpeed CPU optimizer" if uses_ds_cpu_optimizer(self.cfg.ds) else ""
        return f"ZeRO-{self.stage} over {self.dp_size * self.seq_size} ranks" \
            + (f" (data {self.dp_size} x seq {self.seq_size})" if self.seq_size > 1 else "") + (f", offload {', '.join(offload)}" if offload else "") \
            + cpu_opt + describe_lora(self.lora, self.cfg.lora.base_quant)

    def build(self, weights: str | None, adapters=None):
        """As PipelineBackend.build. Under ZeRO-3 the model is partitioned as it is built
        (zero.Init) and weights are set one gathered layer at a time."""
        import deepspeed

        cfg, model = self.cfg, self.model
        ds = deepspeed_config(cfg, pipeline=False)
        self.seq = make_group(D.world_size(), self.seq_size)
        opts = layer_options(cfg, pipeline=False, seq=self.seq)
        with deepspeed.zero.Init(enabled=self.stage == 3, config_dict_or_path=ds):
            module = SequentialModel(model.family, model.args, opts)
        module.loss_fn = training_loss(model.family, model.args, opts)
        self._pop_metrics = getattr(module.loss_fn, "pop_metrics", None)
        if self.stage == 3:
            self._register_tied_weights(module)
        self.module = self.loss_owner = module
        if weights == "scratch":
            self._each_layer(lambda idx, layer: init_layer(layer, cfg.seed, idx), modifier_rank=0)
        elif weights:
            self._load(weights)
        if self.lora:
            self.trainable = self._with_lora(adapters)
            if cfg.lora.base_quant != "none":  # QLoRA on ZeRO-1/2: the loaded blocks, before DeepSpeed moves them
                quantize_loaded(cfg, model, self.lora, module.owned_layers())
        optimizer = build_optimizer(cfg.ds.get("optimizer"), module.named_parameters(), cfg.ds)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds)
        return self.engine

    def train_step(self, micro_batches: list) -> float:
        import torch.distributed as dist

        engine, total = self.engine, None
        for inputs, labels in on_device(micro_batches, engine.device):
            loss = self.module.loss_fn(engine(*inputs), labels)
            engine.backward(loss)  # scaled by 1/gradient_accumulation_steps inside
            engine.step()  # the update happens only at the accumulation boundary
            total = loss.detach().float() if total is None else total + loss.detach().float()
        mean = total / self.cfg.grad_accum  # what PipelineEngine._aggregate_total_loss reports
        if D.world_size() > 1:  # over data x seq ranks (a seq rank's loss is its slice's share x seq)
            dist.all_reduce(mean)
            mean /= D.world_size()
        return float(mean)

    def grad_norm(self) -> float | None:
        return _grad_norm(self.engine)

    def loss_metrics(self) -> dict:
        if self._pop_metrics is None:
            return {}
        return seq_mean({k: v / self.cfg.grad_accum for k, v in self._pop_metrics().items()}, self.seq)

    def _with_lora(self, adapters) -> int:
        """with_lora on the whole model. ZeRO-3: the adapters are made (the same on every rank, seeded
        by layer) as plain tensors in the dtype of the linear they adapt, then partitioned like the
        base before the optimizer and engine see them (DeepSpeed's own conversion, one parameter at a
        time: rank 0's copy broadcast, each rank keeps its slice), so they are ZeRO-3 parameters, the
        optimizer holds fp32 partitions of the adapters only, and checkpoints gather them one at a time
        (reshape.save). A LoRA tag's adapters (and modules_to_save, partitioned from the start) are
        then set gathered layer by layer, rank 0's values kept."""
        from models.lora import LoraLinear

        module, model, cfg = self.module, self.model, self.cfg
        if self.stage != 3:
            return with_lora(self.lora, module.owned_layers(), model, cfg.seed, adapters)
        n = with_lora(self.lora, module.owned_layers(), model, cfg.seed, None)
        fresh = []
        for m in module.modules():
            if isinstance(m, LoraLinear):
                dtype = getattr(m.weight, "ds_tensor", m.weight).dtype  # the base's (bf16 / fp16 / fp32)
                for p in (*m.lora_A.values(), *m.lora_B.values()):
                    p.data = p.data.to(dtype)
                    fresh.append(p)
        base = next(p for p in module.parameters() if hasattr(p, "ds_id"))
        base.convert_to_zero_parameters(param_list=fresh)
        if adapters is not None:
            import deepspeed

            for idx, layer in module.owned_layers():
                params = [p for p in layer.parameters() if p.requires_grad]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    load_adapters([(idx, layer)], adapters)
        return n

    # ------------------------------------------------------------------ weights, layer by layer
    def _each_layer(self, fn, modifier_rank: int | None) -> None:
        """fn(idx, layer) with that layer's full parameters present (ZeRO-3: gathered, then
        re-partitioned; with modifier_rank=0 rank 0's changes are what every rank keeps)."""
        import deepspeed

        for idx, layer in self.module.owned_layers():
            with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=modifier_rank):
                fn(idx, layer)

    def _load(self, model_path: str) -> None:
        """Layer by layer from a pipeline checkpoint dir or an HF dir; every rank checks keys and
        shapes (an error stops all ranks, none waits in a collective)."""
        source = open_weights(model_path, self.model)

        def load(idx, layer):
            state = source.layer(idx)
            with torch.no_grad():
                layer.load_state_dict(state)

        self._each_layer(load, modifier_rank=0)

    @staticmethod
    def _register_tied_weights(module: SequentialModel) -> None:
        """A tied head uses the embedding's weight outside the embedding's forward: tell ZeRO-3 to
        gather it for the whole model's forward/backward."""
        import deepspeed

        for i, d in enumerate(module.defs):
            if d.tie is not None and d.forward_fn is not None:  # the twin that borrows the owner's weight
                for p in module._modules[str(i)].parameters():
                    deepspeed.zero.register_external_parameter(module, p)


def lora_spec(cfg: TrainConfig, model: Model) -> LoraSpec | None:
    """The run's LoRA spec (None: full fine-tuning), its names checked against the model's modules."""
    spec = LoraSpec.of(cfg.lora)
    if spec is not None:
        try:
            check_spec(spec, model.family, model.args)
        except ValueError as e:
            raise ConfigError(f"{cfg.source}: {e}") from None
        init_adapters(cfg, spec, model)  # lora.init_from: readable, for this model, as the lora keys say
    return spec


def with_lora(spec: LoraSpec, layers: list, model: Model, seed: int, adapters) -> int:
    """Adapters on this rank's layers (after the base weights are in), everything else frozen, the
    adapters resumed from a LoRA tag when given; returns the trainable parameters here. Frozen
    parameters are outside the optimizer, so DeepSpeed gives them no fp32 master, gradient or state."""
    n = add_lora(layers, model.family, model.args, spec, seed)
    if adapters is not None:
        load_adapters(layers, adapters)
    return n


def freeze_tied_twins(module, spec: LoraSpec, model: Model, resumed: bool) -> None:
    """A tied head borrows the embedding's module as a forward_fn (no nn.Module of its own in
    forward_funcs), so with_lora never sees it on a stage that holds only the twin. Give its weight
    the owner's trainable state: DeepSpeed's ReduceTiedGrads all-reduces the tied weight's gradient
    over the stages that hold it only where that gradient exists, so a weight frozen on one stage and
    trained on the other leaves the stages in different collectives (a hang). A resumed modules_to_save
    embedding is then copied from its owner's stage (only the owner's layer file holds it)."""
    from models.lora import is_trainable

    keys = model.family.hf_keys(model.args)
    for key, comm in getattr(module, "tied_comms", {}).items():
        owner = min(i for i, s in enumerate(module._layer_specs) if getattr(s, "key", None) == key)
        for name, p in comm["module"].named_parameters():
            p.requires_grad_(is_trainable(name, keys[owner], spec))
    if resumed and getattr(module, "tied_comms", None):
        module._synchronize_tied_weights()  # a collective of every stage holding a tied module, in key order


def describe_lora(spec: LoraSpec | None, base_quant: str = "none") -> str:
    if spec is None:
        return ""
    targets = spec.target_modules if isinstance(spec.target_modules, str) else ",".join(spec.target_modules)
    return f", LoRA r {spec.r} alpha {spec.alpha:g} on {targets}" + \
        (f" + {','.join(spec.modules_to_save)}" if spec.modules_to_save else "") + "; base frozen" + \
        (f", its block linears in {base_quant.upper()}" if base_quant != "none" else "")



def seq_mean(metrics: dict, seq) -> dict:
    """Loss metrics of a seq group's ranks averaged: each holds its slice's share of the row's values
    (the LM term's scale counts the seq ranks), so their mean is the whole rows' value."""
    if seq is None or not metrics:
        return metrics
    import torch.distributed as dist

    values = D.comm_tensor([float(v) for v in metrics.values()]).double()
    dist.all_reduce(values, group=seq.group)
    return dict(zip(metrics, (values / seq.size).tolist()))


def on_device(micro_batches: list, device) -> list:
    """The whole step's micro-batches on the GPU before its first kernel: one async copy each from
    pinned host memory. Copied later from pageable memory (what DeepSpeed's pipeline engine does
    as it loads each micro-batch) every copy waits for the GPU's queue to drain, so the GPU idles
    while the host launches the next micro-batch: ~6% of a 7B step on an H200 (bench/README.md)."""
    if torch.device(device).type != "cuda":
        return micro_batches
    return [tuple(tuple(t.pin_memory().to(device, non_blocking=True) for t in part) for part in mb)
            for mb in micro_batches]


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None
