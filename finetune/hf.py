"""Hugging Face Llama-family checkpoints -> MindFormers Llama (names, shapes, tied embeddings, GQA).

Parameter names map one to one (checked against HF transformers' logits on a real tiny Llama):
no transpose (both store Linear weights as [out, in]) and no rotary permutation, because
MindFormers' slice rotation (use_rope_slice) is HF's rotate_half. InternLM-7B is the same
layout plus biases on q/k/v/o.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .model import ModelError

# Architectures whose HF checkpoints use the Llama parameter layout.
LLAMA_FAMILY = {"LlamaForCausalLM", "InternLMForCausalLM", "MistralForCausalLM"}
_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
        "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}


def is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(path: str | Path) -> dict:
    """ModelConfig fields from an HF config.json; the model's dimensions come from here."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"model.checkpoint: {path} has no config.json (expected a Hugging Face model folder)")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None
    archs = set(hf.get("architectures") or [])
    if not archs & LLAMA_FAMILY and hf.get("model_type") not in ("llama", "internlm"):
        raise ModelError(f"{file}: architectures {sorted(archs) or hf.get('model_type')!r} is not Llama-family "
                         f"(supported: {', '.join(sorted(LLAMA_FAMILY))})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise ModelError(f"{file}: '{key}' missing or not an integer")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ModelError(f"{file}: head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']} "
                         f"(not supported by MindFormers Llama)")
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    bias = bool(hf.get("attention_bias", hf.get("bias", False)))   # InternLM calls it "bias"
    return {
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") if hf.get("num_key_value_heads") not in (None, heads) else None,
        "intermediate_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope),
        "qkv_has_bias": bias,
        "attn_proj_has_bias": bias,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def load_hf_state(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of *.safetensors (or *.bin when torch is installed) as float32 numpy arrays."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, np.ndarray] = {}
    if files:
        from safetensors.numpy import load_file

        for f in files:
            try:
                state.update(load_file(str(f)))
            except Exception as e:  # a truncated or foreign file: say which
                raise ModelError(f"{f}: cannot read safetensors ({e})") from None
    else:
        bins = sorted(path.glob("*.bin"))
        if not bins:
            raise ModelError(f"model.checkpoint: {path} has no *.safetensors or *.bin weight files")
        try:
            import torch
        except ImportError:
            raise ModelError(f"{path}: weights are PyTorch *.bin, which need torch (pip install torch); "
                             f"or convert them to safetensors") from None
        for f in bins:
            for k, v in torch.load(str(f), map_location="cpu", weights_only=True).items():
                state[k] = v.float().numpy()
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


def to_mindformers(state: dict[str, np.ndarray], num_layers: int, tied: bool) -> dict[str, np.ndarray]:
    """Rename HF tensors to MindFormers Llama parameter names."""
    out = {}
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for name, value in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        if name in _TOP:
            if name == "lm_head.weight" and tied:
                continue  # shares the embedding
            out[_TOP[name]] = value
            continue
        m = layer_re.match(name)
        if not m or m.group(2) not in _LAYER or int(m.group(1)) >= num_layers:
            raise ModelError(f"HF checkpoint: unexpected tensor {name!r} for a {num_layers}-layer Llama")
        out[f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"] = value
    return out
