"""A GGUF file's metadata read as `model` config keys, as hf_config.py does for a Hugging Face
folder's config.json (folded into the config by config/checks.py before any check runs). Tensors
are read by finetune/model/gguf.py, the tokenizer by finetune/data/hf_tokenizer.py."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from finetune.errors import ModelError

# GGUF architectures with the Llama tensor layout: llama (q/k rows permuted by llama.cpp's converter,
# finetune/model/gguf.py undoes it) and qwen2 (q/k/v biases, no o bias, rows as Hugging Face has them).
GGUF_ARCHITECTURES = ("llama", "qwen2")


def is_gguf(path) -> bool:
    return path is not None and str(path).endswith(".gguf")


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int) -> tuple:
    """(the reader, its fields) once per file and process: parsing a GGUF file's metadata takes
    seconds (SmolLM2's 49,152 tokens and 48,900 merges: 7-12 s here)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:   # not GGUF, truncated: the reader's own error, on one line
        raise ModelError(f"model.checkpoint: {path} is not a readable GGUF file ({' '.join(str(e).split())[:160]})") from None
    out = {name: field.contents() for name, field in reader.fields.items()}
    out["_tensors"] = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors}
    return reader, out


def _parsed(path) -> tuple:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.checkpoint: GGUF file {path} not found")
    return _read(str(path.resolve()), path.stat().st_mtime_ns)


def gguf_reader(path):
    """The gguf package's reader of a GGUF file (its tensors: finetune/model/gguf.py)."""
    return _parsed(path)[0]


def gguf_fields(path) -> dict:
    """Every metadata field of a GGUF file ({name: value}) plus `_tensors`: {name: (shape, type)}."""
    return _parsed(path)[1]


def read_gguf_config(path) -> dict:
    """ModelConfig fields from a GGUF file's metadata; the model's dimensions come from here."""
    f = gguf_fields(path)
    arch = f.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(f"model.checkpoint: {path} holds a {arch!r} model; supported GGUF architectures: "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    missing = [k for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
               if f"{arch}.{k}" not in f]
    if missing:
        raise ModelError(f"model.checkpoint: {path} lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    scaling = f.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelError(f"model.checkpoint: {path} uses rope scaling {scaling!r}, which MindFormers' Llama here "
                         f"does not apply")
    tensors = f["_tensors"]
    hidden, heads = int(f[f"{arch}.embedding_length"]), int(f[f"{arch}.attention.head_count"])
    kv = int(f.get(f"{arch}.attention.head_count_kv", heads))
    vocab = int(f.get(f"{arch}.vocab_size") or len(f.get("tokenizer.ggml.tokens") or []))
    return {
        "hidden_size": hidden,
        "num_layers": int(f[f"{arch}.block_count"]),
        "num_heads": heads,
        "n_kv_heads": kv if kv != heads else None,
        "intermediate_size": int(f[f"{arch}.feed_forward_length"]),
        "vocab_size": vocab,
        "rms_norm_eps": float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "qkv_has_bias": "blk.0.attn_q.bias" in tensors,
        "attn_proj_has_bias": "blk.0.attn_output.bias" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
