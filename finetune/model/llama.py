"""The model: MindSpore context from the `hardware` group, MindFormers Llama from the `model` group.

All architecture facts live here. CPU vs Ascend differences are values of the hardware group
(fused kernels, dtypes, rope slice), never `if device == ...` branches.
"""
from __future__ import annotations

import logging
from pathlib import Path

from finetune.data.records import IGNORE_ID
from finetune.errors import ModelError
from finetune.model.adapter import ADAPTER_TAG
from finetune.model.checkpoint import read_checkpoint

log = logging.getLogger(__name__)


def context_kwargs(hw) -> dict:
    """The `mindspore.set_context` arguments for the hardware group (pure: testable for Ascend on CPU).
    hardware.mode and device_target are schema enums, checked when the config is composed."""
    import mindspore as ms

    kwargs = {"mode": {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}[str(hw.mode)],
              "device_target": str(hw.device_target)}
    if hw.max_device_memory and str(hw.device_target) != "CPU":
        kwargs["max_device_memory"] = hw.max_device_memory
    return kwargs


def setup_context(hw, seed: int) -> None:
    import mindspore as ms

    ms.set_context(**context_kwargs(hw))
    ms.set_seed(seed)


def llama_config(model_cfg, hw, vocab_size: int, tok, batch_size: int, dynamic: bool = True):
    """MindFormers LlamaConfig for the model + hardware groups. dynamic (is_dynamic): the model takes
    any sequence length up to seq_length (the causal mask and rotary tables are sliced to the input),
    so batches can be cut to their length bucket (finetune/model/forward.py)."""
    from mindformers import LlamaConfig

    return LlamaConfig(
        batch_size=batch_size,
        seq_length=model_cfg.seq_length,
        hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads,
        n_kv_heads=model_cfg.n_kv_heads,
        intermediate_size=model_cfg.intermediate_size,
        vocab_size=vocab_size,
        rms_norm_eps=model_cfg.rms_norm_eps,
        theta=model_cfg.rope_theta,
        qkv_has_bias=model_cfg.qkv_has_bias,
        attn_proj_has_bias=model_cfg.attn_proj_has_bias,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        init_method_std=model_cfg.init_std,
        bos_token_id=tok.bos_id if tok.bos_id is not None else tok.pad_id,   # Qwen2 has no BOS
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        ignore_token_id=IGNORE_ID,
        compute_dtype=hw.compute_dtype,
        param_init_type=hw.param_init_type,
        layernorm_compute_type=hw.layernorm_compute_type,
        softmax_compute_type=hw.softmax_compute_type,
        rotary_dtype=hw.rotary_dtype,
        fused_rms_norm=hw.fused_rms_norm,
        use_rope_slice=hw.use_rope_slice,
        use_flash_attention=hw.use_flash_attention,
        # MindFormers reads recompute from parallel_config.recompute (a recompute_config key is ignored).
        parallel_config={"recompute": {"recompute": hw.recompute}},
        use_past=False,
        is_dynamic=dynamic,
        checkpoint_name_or_path="",
    )




def release_graphs() -> None:
    """Free the buffers of every compiled graph. MindSpore keeps a graph's memory for the life of the
    process, even after its model and step objects are gone (measured: a second training of the same
    model in one process took resident memory from 7.7 to 13.3 GB; after this call, 2.2 and 8.7), so
    app.run calls it after the artifacts and after each stage: a stage never reuses another's graphs,
    and evaluation then starts from the memory training left, not on top of it."""
    import gc

    import mindspore as ms

    gc.collect()
    ms.ms_memory_recycle()


def vocab_size_for(model_cfg, tok) -> int:
    vocab = model_cfg.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise ModelError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tok.vocab_size} ({tok.name})")
    return vocab


def build_model(model_cfg, hw, tok, batch_size: int, seed: int | None = None, dynamic: bool = True):
    """A LlamaForCausalLM with MindSpore's initializers. `seed` (when given) seeds that init: only
    a random-init base (finetune/training/base.py) depends on it; every stage loads weights from a file."""
    import mindspore as ms
    from mindformers import LlamaForCausalLM

    if seed is not None:
        ms.set_seed(seed)
    return LlamaForCausalLM(llama_config(model_cfg, hw, vocab_size_for(model_cfg, tok), tok, batch_size, dynamic))


def load_model(model_cfg, hw, tok, batch_size: int, checkpoint: str | Path, what: str = "base checkpoint"):
    """build_model + load_checkpoint: how every stage gets its base model."""
    net = build_model(model_cfg, hw, tok, batch_size)
    load_checkpoint(net, checkpoint, what)
    return net


def load_checkpoint(net, path: str | Path, what: str = "model.checkpoint") -> None:
    """Load a MindSpore .ckpt into `net` (see load_weights for the checks)."""
    load_weights(net, read_checkpoint(path, what), f"{what} {path}")


def load_weights(net, params: dict, what: str) -> None:
    """Copy numpy tensors into `net`, insisting that every base parameter is present with the
    shape the model config implies (a silently half-loaded model is the worst outcome)."""
    import mindspore as ms

    expected = {p.name: p for p in net.get_parameters() if ADAPTER_TAG not in p.name}
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ModelError(f"{what}: lacks {len(missing)} parameter(s) the model needs, e.g. {missing[:3]}")
    for name, p in expected.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise ModelError(f"{what}: {name} has shape {tuple(params[name].shape)}, "
                             f"the model config needs {tuple(p.shape)}")
    ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(params[k], p.dtype), name=k)
                                 for k, p in expected.items()}, strict_load=True)


def count_params(net) -> dict[str, int]:
    """Base and adapter parameter counts. Tied embeddings share one Parameter, counted once."""
    seen, base, adapter, trainable = set(), 0, 0, 0
    for p in net.get_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ADAPTER_TAG in p.name:
            adapter += p.size
        else:
            base += p.size
        if p.requires_grad:
            trainable += p.size
    return {"base": base, "adapter": adapter, "trainable": trainable}


def param_summary(counts: dict) -> dict:
    """The seed reports trainable / base total (8.39M / 7.32B = 0.1146%); with the adapter in the
    denominator the figure is slightly smaller."""
    return {
        "trainable_params": counts["trainable"],
        "total_params": counts["base"],
        "adapter_params": counts["adapter"],
        "trainable_ratio_pct": 100.0 * counts["trainable"] / counts["base"],
        "trainable_ratio_pct_with_adapter": 100.0 * counts["trainable"] / (counts["base"] + counts["adapter"]),
    }
