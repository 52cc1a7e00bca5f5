"""GGUF weights (llama.cpp's format) -> float32 numpy tensors under Hugging Face Llama names, which
model/layout.py then maps to MindFormers' (the metadata -> model config keys is
finetune/config/gguf_config.py; the tokenizer, finetune/data/hf_tokenizer.py).

Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized by the `gguf` package. llama.cpp's
converter permutes the rows of q and k for the llama architecture (its rotary embedding pairs
neighbouring dimensions where Hugging Face pairs the two halves); that permutation is undone here so
that MindFormers' rotary (Hugging Face's rotate_half) sees the rows it expects.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from finetune.errors import ModelError

TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj", "ffn_up": "mlp.up_proj"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...) of
    the Hugging Face layout were interleaved; put the two halves back."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_state(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 under its Hugging Face Llama name."""
    import gguf

    from finetune.config.gguf_config import gguf_fields, gguf_reader, read_gguf_config

    path = Path(path)
    model = read_gguf_config(path)
    arch = gguf_fields(path)["general.architecture"]
    # rows of q and k per head group that llama.cpp permuted (llama only; qwen2 keeps HF's order)
    permuted = {"attn_q": model["num_heads"], "attn_k": model["n_kv_heads"] or model["num_heads"]} \
        if arch == "llama" else {}
    out = {}
    for t in gguf_reader(path).tensors:
        m = _BLOCK.match(t.name)
        if t.name in TOP:
            name, part = TOP[t.name], None
        elif m and m.group(2) in LAYER:
            name, part = f"model.layers.{m.group(1)}.{LAYER[m.group(2)]}.{m.group(3)}", m.group(2)
        else:
            raise ModelError(f"{path}: unexpected tensor {t.name!r} for a Llama-layout model")
        try:
            value = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which the gguf package cannot "
                             f"dequantize") from None
        # GGUF lists dimensions fastest first: ne = (columns, rows) is a [rows, columns] matrix
        value = np.asarray(value, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if part in permuted:
            value = unpermute(value, permuted[part])
        out[name] = value
    return out
