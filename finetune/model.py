"""The model: MindSpore context from the `hardware` group, MindFormers Llama from the `model` group.

All architecture facts live here. CPU vs Ascend differences are values of the hardware group
(fused kernels, dtypes, rope slice), never `if device == ...` branches.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("finetune.model")


class ModelError(ValueError):
    """A model/checkpoint problem found before any long work starts."""


def context_kwargs(hw) -> dict:
    """The `mindspore.set_context` arguments for the hardware group (pure: testable for Ascend on CPU)."""
    import mindspore as ms

    mode = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}.get(hw.mode)
    if mode is None:
        raise ModelError(f"hardware.mode: expected 'graph' or 'pynative', got {hw.mode!r}")
    if hw.device_target not in ("CPU", "Ascend"):
        raise ModelError(f"hardware.device_target: expected 'CPU' or 'Ascend', got {hw.device_target!r}")
    kwargs = {"mode": mode, "device_target": hw.device_target}
    if hw.max_device_memory and hw.device_target != "CPU":
        kwargs["max_device_memory"] = hw.max_device_memory
    return kwargs


def setup_context(hw, seed: int) -> None:
    import mindspore as ms

    ms.set_context(**context_kwargs(hw))
    ms.set_seed(seed)
    quiet_mindformers()


def quiet_mindformers() -> None:
    """MindFormers logs INFO lines to stdout for every model built; keep its warnings and errors
    on the terminal (its full log still goes to <run dir>/mindformers/log)."""
    import mindformers  # noqa: F401  (creates its logger)

    for handler in logging.getLogger("mindformers").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def llama_config(model_cfg, hw, vocab_size: int, tok, batch_size: int):
    """MindFormers LlamaConfig for the model + hardware groups."""
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
        bos_token_id=tok.bos_id,
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
        checkpoint_name_or_path="",
    )


# Label value that the loss ignores (prompt tokens and padding); MindFormers' default.
IGNORE_ID = -100


def resolve_model_config(model_cfg) -> None:
    """When model.checkpoint is a Hugging Face folder, its config.json defines the architecture:
    copy those fields into model_cfg (in place), overriding the group's values."""
    from .hf import is_hf_dir, read_hf_config

    if model_cfg.checkpoint and is_hf_dir(model_cfg.checkpoint):
        for key, value in read_hf_config(model_cfg.checkpoint).items():
            if model_cfg[key] != value:
                log.info("model.%s = %s (from %s/config.json)", key, value, model_cfg.checkpoint)
            model_cfg[key] = value


def vocab_size_for(model_cfg, tok) -> int:
    vocab = model_cfg.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise ModelError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tok.vocab_size} ({tok.name})")
    return vocab


def build_model(model_cfg, hw, tok, batch_size: int, seed: int):
    """A LlamaForCausalLM with random init from `seed` (then `load_checkpoint` if one is given)."""
    import mindspore as ms
    from mindformers import LlamaForCausalLM

    ms.set_seed(seed)
    return LlamaForCausalLM(llama_config(model_cfg, hw, vocab_size_for(model_cfg, tok), tok, batch_size))


def load_checkpoint(net, path: str | Path, what: str = "model.checkpoint") -> None:
    """Load a MindSpore .ckpt into `net` (see load_weights for the checks)."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what}: checkpoint {path} not found")
    try:
        params = ms.load_checkpoint(str(path))
    except Exception as e:  # truncated / not a checkpoint: name the file, not MindSpore's internals
        raise ModelError(f"{what}: cannot read {path} as a MindSpore checkpoint ({str(e).splitlines()[0]})") from None
    load_weights(net, {k: v.asnumpy() for k, v in params.items()}, f"{what} {path}")


def load_weights(net, params: dict, what: str) -> None:
    """Copy numpy tensors into `net`, insisting that every base parameter is present with the
    shape the model config implies (a silently half-loaded model is the worst outcome)."""
    import mindspore as ms

    expected = {p.name: p for p in net.get_parameters() if "mindpet_delta" not in p.name}
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ModelError(f"{what}: lacks {len(missing)} parameter(s) the model needs, e.g. {missing[:3]}")
    for name, p in expected.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise ModelError(f"{what}: {name} has shape {tuple(params[name].shape)}, "
                             f"the model config needs {tuple(p.shape)}")
    ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(params[k], p.dtype), name=k)
                                 for k, p in expected.items()}, strict_load=True)


def save_checkpoint(params: list, path: str | Path) -> None:
    """Write [(name, Parameter)] atomically: a temp file in the same folder, then rename."""
    import mindspore as ms

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".ckpt":
        raise ModelError(f"checkpoint file names must end in .ckpt (MindSpore appends it otherwise): {path}")
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.ckpt")  # per process: msrun workers may race
    ms.save_checkpoint([{"name": name, "data": p} for name, p in params], str(tmp))
    tmp.replace(path)


def count_params(net) -> dict[str, int]:
    """Base and adapter parameter counts. Tied embeddings share one Parameter, counted once."""
    seen, base, adapter, trainable = set(), 0, 0, 0
    for p in net.get_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "mindpet_delta" in p.name:
            adapter += p.size
        else:
            base += p.size
        if p.requires_grad:
            trainable += p.size
    return {"base": base, "adapter": adapter, "trainable": trainable}
