"""A Hugging Face model folder's config.json read as `model` config keys: the architecture of a
run whose model.checkpoint is such a folder (folded into the config by finetune/config/checks.py
before any check runs). Weights are read by finetune/model/hf.py."""
from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import ModelError

# Architectures whose HF checkpoints use the Llama parameter layout (finetune/model/layout.py).
# Qwen2 is Llama with biases on q/k/v (none on o); InternLM v1 with biases on q/k/v/o.
LLAMA_FAMILY = {"LlamaForCausalLM", "InternLMForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


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
    if not archs & LLAMA_FAMILY and hf.get("model_type") not in ("llama", "internlm", "qwen2"):
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
    if hf.get("use_sliding_window"):
        raise ModelError(f"{file}: use_sliding_window=true is not supported (MindFormers' Llama attends to the "
                         f"whole window)")
    qwen2 = "Qwen2ForCausalLM" in archs or hf.get("model_type") == "qwen2"
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
        "qkv_has_bias": bias or qwen2,          # Qwen2: always on q/k/v
        "attn_proj_has_bias": bias and not qwen2,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def checkpoint_tokenizer(checkpoint: str | Path) -> dict | None:
    """{kind, path} of the tokenizer a checkpoint carries: a GGUF file's vocabulary, an HF folder's
    tokenizer.json (kind hf) or tokenizer.model (sentencepiece); None when it carries none."""
    from finetune.config.gguf_config import is_gguf

    path = Path(checkpoint)
    if is_gguf(path):
        return {"kind": "hf", "path": str(path)}
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return {"kind": "hf", "path": str(path)}
        if (path / "tokenizer.model").is_file():
            return {"kind": "sentencepiece", "path": str(path / "tokenizer.model")}
    return None
