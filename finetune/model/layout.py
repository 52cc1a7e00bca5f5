"""The Llama tensor layout, in one place: MindFormers' parameter names and shapes, and their
Hugging Face names. Used by the HF import (finetune/model/hf.py), the export stage and the plan stage.

Names map one to one (checked against HF transformers' logits on a real tiny Llama): no transpose
(both store Linear weights as [out, in]) and no rotary permutation, because MindFormers' slice
rotation (use_rope_slice) is HF's rotate_half. InternLM-7B is the same layout plus q/k/v/o biases.
"""
from __future__ import annotations

import re

import numpy as np

from finetune.errors import ModelError

# Per decoder layer: HF name -> MindFormers name.
LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
TOP = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
       "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
LAYER_TO_HF = {mf: hf for hf, mf in LAYER.items()}
TOP_TO_HF = {mf: hf for hf, mf in TOP.items()}
NORMS = ("attention_norm", "ffn_norm")
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def dense_layers(model_cfg) -> dict[str, tuple[int, int]]:
    """The decoder layers' Linears of MindFormers' Llama as {cell name: (in_channels, out_channels)}
    (lm_head, the other Linear, is counted apart). With GQA, wk/wv project to n_kv_heads x head_dim."""
    h, ffn = model_cfg.hidden_size, model_cfg.intermediate_size
    kv = (model_cfg.n_kv_heads or model_cfg.num_heads) * (h // model_cfg.num_heads)
    shapes = {"attention.wq": (h, h), "attention.wk": (h, kv), "attention.wv": (h, kv), "attention.wo": (h, h),
              "feed_forward.w1": (h, ffn), "feed_forward.w2": (ffn, h), "feed_forward.w3": (h, ffn)}
    return {f"model.layers.{i}.{name}": shape for i in range(model_cfg.num_layers) for name, shape in shapes.items()}


def module_param_counts(model_cfg, vocab_size: int | None) -> dict[str, int]:
    """Parameters per cell of MindFormers' LlamaForCausalLM, keyed by its cell names (parameter
    name minus .weight/.bias/.embedding_weight). vocab_size None (unknown): embedding and head
    count 0. Tied embeddings: one Parameter, counted once under model.tok_embeddings."""
    h, vocab = model_cfg.hidden_size, vocab_size or 0
    counts = {"model.tok_embeddings": vocab * h}
    for name, (n_in, n_out) in dense_layers(model_cfg).items():
        bias = 0
        if name.endswith(("wq", "wk", "wv")) and model_cfg.qkv_has_bias:
            bias = n_out
        if name.endswith("wo") and model_cfg.attn_proj_has_bias:
            bias = n_out
        counts[name] = n_in * n_out + bias
    for i in range(model_cfg.num_layers):
        for norm in NORMS:
            counts[f"model.layers.{i}.{norm}"] = h
    counts["model.norm_out"] = h
    if not model_cfg.tie_word_embeddings:
        counts["lm_head"] = vocab * h
    return counts


def hf_names(model_cfg) -> set[str]:
    """Every tensor name an HF Llama checkpoint of this architecture has (tied: no lm_head.weight,
    as HF's save_pretrained writes it)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not model_cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    biased = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} if model_cfg.qkv_has_bias else set()
    if model_cfg.attn_proj_has_bias:
        biased.add("self_attn.o_proj")
    for i in range(model_cfg.num_layers):
        names |= {f"model.layers.{i}.{part}.weight" for part in LAYER}
        names |= {f"model.layers.{i}.{part}.bias" for part in biased}
    return names


def to_mindformers(state: dict[str, np.ndarray], num_layers: int, tied: bool) -> dict[str, np.ndarray]:
    """Rename HF tensors to MindFormers Llama parameter names."""
    out = {}
    for name, value in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        if name in TOP:
            if name == "lm_head.weight" and tied:
                continue  # shares the embedding
            out[TOP[name]] = value
            continue
        m = _LAYER_RE.match(name)
        if not m or m.group(2) not in LAYER or int(m.group(1)) >= num_layers:
            raise ModelError(f"HF checkpoint: unexpected tensor {name!r} for a {num_layers}-layer Llama")
        out[f"model.layers.{m.group(1)}.{LAYER[m.group(2)]}.{m.group(3)}"] = value
    return out


def to_hf(params: dict[str, np.ndarray], model_cfg) -> dict[str, np.ndarray]:
    """MindFormers Llama parameters -> HF Llama tensors (same arrays, renamed). The result must hold
    exactly the tensors `hf_names(model_cfg)` lists: a missing or unexpected one is an error."""
    out = {}
    for name, value in params.items():
        if name in TOP_TO_HF:
            out[TOP_TO_HF[name]] = value
            continue
        m = _LAYER_RE.match(name)
        if not m or m.group(2) not in LAYER_TO_HF:
            raise ModelError(f"export: parameter {name!r} has no Hugging Face Llama name")
        out[f"model.layers.{m.group(1)}.{LAYER_TO_HF[m.group(2)]}.{m.group(3)}"] = value
    expected = hf_names(model_cfg)
    if set(out) != expected:
        missing, extra = sorted(expected - set(out)), sorted(set(out) - expected)
        raise ModelError(f"export: the weights do not fit model config {model_cfg.name!r} "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    return out
