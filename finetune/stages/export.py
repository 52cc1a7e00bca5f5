"""Stage `export`: the model as a Hugging Face Llama folder (config.json, model.safetensors,
tokenizer files) that other tools can load and serve.

Weights: run_dir/merged.ckpt when the merge stage wrote one, else base + adapter merged on the fly,
else (no adapter) the base. Tensor names come from finetune/model/layout.py; values are copied
unchanged, so HF -> project -> HF is bit-for-bit where nothing was trained.

Tokenizer: a SentencePiece model is copied as tokenizer.model (+ tokenizer_config.json naming
LlamaTokenizer). A tiktoken encoding (a rank file, or the built-in demo encoding) is written as
tokenizer.json, the `tokenizers` library's byte-level BPE format that
transformers.PreTrainedTokenizerFast / AutoTokenizer load; it gives the same ids as the project.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from finetune import rundir
from finetune.config import is_hf_dir
from finetune.errors import ModelError
from finetune.model import (
    MERGED_KEY_HF,
    MERGED_META,
    adapter_path,
    base_tensors,
    merge_lora,
    merged_marker,
    read_adapter,
    read_checkpoint,
    refuse_merged_base,
    to_hf,
)

log = logging.getLogger(__name__)


def hf_config(model_cfg, tensors: dict[str, np.ndarray], tok) -> dict:
    """config.json for HF transformers' LlamaForCausalLM. vocab_size and dtype are read from the
    tensors; hidden and FFN sizes are checked against them."""
    embed = tensors["model.embed_tokens.weight"]
    ffn = tensors["model.layers.0.mlp.gate_proj.weight"].shape[0] if model_cfg.num_layers else model_cfg.intermediate_size
    if (embed.shape[1], ffn) != (model_cfg.hidden_size, model_cfg.intermediate_size):
        raise ModelError(f"export: weights have hidden size {embed.shape[1]} / FFN {ffn}, but model "
                         f"{model_cfg.name!r} says {model_cfg.hidden_size} / {model_cfg.intermediate_size}")
    # Llama's attention_bias sets q/k/v/o together; biases on q/k/v alone are Qwen2's layout
    qwen2 = model_cfg.qkv_has_bias and not model_cfg.attn_proj_has_bias
    if model_cfg.attn_proj_has_bias and not model_cfg.qkv_has_bias:
        raise ModelError("export: a bias on o but not on q/k/v (model.attn_proj_has_bias without "
                         "model.qkv_has_bias) is neither Hugging Face's Llama nor Qwen2 layout")
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.intermediate_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.n_kv_heads or model_cfg.num_heads,
        "head_dim": model_cfg.hidden_size // model_cfg.num_heads,
        "hidden_act": "silu",
        "vocab_size": int(embed.shape[0]),
        "max_position_embeddings": model_cfg.seq_length,
        "rms_norm_eps": model_cfg.rms_norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "tie_word_embeddings": bool(model_cfg.tie_word_embeddings),
        **({} if qwen2 else {"attention_bias": bool(model_cfg.qkv_has_bias)}),
        "mlp_bias": False,
        "initializer_range": model_cfg.init_std,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": str(embed.dtype),   # numpy's float32 / float16 are torch's names too
    }


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table that the `tokenizers` ByteLevel steps use:
    printable Latin-1 bytes stand for themselves, the other 68 take code points 256, 257, ..."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def bpe_tokenizer_json(ranks: dict[bytes, int], specials: list[str], pattern: str) -> str:
    """A `tokenizers` byte-level BPE equal to tiktoken's encoding with these ranks: the vocabulary
    is the ranks; tiktoken merges the adjacent pair whose join has the lowest rank, so every split
    (left, right) of a token into two known pieces is a merge, ordered by the token's rank.
    `specials` get the ids after the ranks, in order (as TiktokenTokenizer numbers them)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        merges += [(text(token[:i]), text(token[i:])) for i in range(1, len(token))
                   if token[:i] in ranks and token[i:] in ranks]
    bpe = BPE({text(t): r for t, r in ranks.items()}, merges, fuse_unk=False)
    bpe.ignore_merges = True   # a pre-token that is itself in the vocabulary stays whole, as in tiktoken
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tokenizer.to_str()


def tokenizer_files(tok_cfg, tok, seq_length: int) -> dict[str, bytes]:
    """Tokenizer files for the export folder, from the tokenizer the model was trained with."""
    from finetune.data import PAT_STR, builtin_ranks, read_tiktoken_file

    def piece(i: int) -> str:
        return tok.sp.id_to_piece(i)

    if tok_cfg.kind == "sentencepiece":
        # Does the model put "▁" before the first word (SentencePiece's add_dummy_prefix)? InternLM's does
        # not. transformers' LlamaTokenizer(Fast) gives SentencePiece's own ids only with legacy=False
        # and this flag (its legacy mode, and the fast one's default, add a stray "▁" before the text).
        dummy_prefix = piece(tok.sp.encode("a")[0]).startswith("\u2581")
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
                  "unk_token": piece(tok.sp.unk_id()), "pad_token": piece(tok.pad_id),
                  "add_bos_token": True, "add_eos_token": False, "legacy": False, "add_prefix_space": dummy_prefix,
                  "model_max_length": seq_length}
        return {"tokenizer.model": Path(tok_cfg.path).read_bytes(),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode()}
    if tok_cfg.kind == "tiktoken":
        ranks = read_tiktoken_file(tok_cfg.path) if tok_cfg.path else builtin_ranks()
        specials = sorted(tok.enc.special_tokens_set, key=tok.enc.encode_single_token)
        by_id = {tok.enc.encode_single_token(s): s for s in specials}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": by_id[tok.bos_id],
                  "eos_token": by_id[tok.eos_id], "pad_token": by_id[tok.pad_id], "model_max_length": seq_length}
        return {"tokenizer.json": bpe_tokenizer_json(ranks, specials, PAT_STR).encode(),
                "tokenizer_config.json": json.dumps(config, indent=2).encode()}
    if tok_cfg.kind == "hf":   # the tokenizer the model came with, as transformers reads it
        from finetune.data import hf_tokenizer_files

        return hf_tokenizer_files(tok, seq_length)
    raise ModelError(f"model.tokenizer.kind: cannot export tokenizer kind {tok_cfg.kind!r}")


def write_hf_folder(out: Path, tensors: dict[str, np.ndarray], config: dict, files: dict[str, bytes]) -> None:
    """Write the folder under a temporary name beside `out`, then rename: a crash leaves either the
    old export or the new one, never half of one. An existing `out` is replaced only if it is an
    HF model folder (or empty)."""
    from safetensors.numpy import save_file

    out = Path(out)
    if out.exists() and not (is_hf_dir(out) or (out.is_dir() and not any(out.iterdir()))):
        raise ModelError(f"export.output: {out} exists and is not a Hugging Face model folder; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):   # from an interrupted export
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    # metadata format=pt: what HF transformers expects of a safetensors checkpoint it loads
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    if out.exists():
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def export_weights(ctx) -> tuple[dict[str, np.ndarray], str, str | None]:
    """(MindFormers parameters, where they came from, merge marker or None) for the export. The
    marker goes into config.json, so that a later merge into the exported model is refused too."""
    cfg, run_dir = ctx.cfg, Path(ctx.run_dir)
    merged = run_dir / rundir.MERGED
    if merged.is_file():
        tensors = read_checkpoint(merged, "export")
        return {k: v for k, v in tensors.items() if k not in MERGED_META}, str(merged), merged_marker(merged)
    adapter = adapter_path(cfg, run_dir)
    if adapter.is_file():
        refuse_merged_base(cfg.model.checkpoint)
        lora, meta = read_adapter(adapter, "export")
        scaling = meta["alpha"] / meta["rank"]
        merged_params = merge_lora(base_tensors(ctx.base_checkpoint), lora, scaling)
        return merged_params, f"base + {adapter}", f"{adapter.name}, scaling {scaling:g}"
    log.info("export: no adapter in %s; exporting the base model", run_dir)
    marker = merged_marker(cfg.model.checkpoint) if cfg.model.checkpoint else None
    return base_tensors(ctx.base_checkpoint), "base", marker


def export(ctx) -> dict:
    """Write export.output (default run_dir/hf) as a Hugging Face Llama folder."""
    cfg, run_dir = ctx.cfg, Path(ctx.run_dir)
    out = Path(cfg.export.output) if cfg.export.output else run_dir / rundir.EXPORT
    params, source, marker = export_weights(ctx)
    tensors = to_hf(params, cfg.model)
    config = hf_config(cfg.model, tensors, ctx.tok)
    if marker:
        config[MERGED_KEY_HF] = marker   # HF transformers keeps unknown config keys as attributes
    write_hf_folder(out, tensors, config, tokenizer_files(cfg.model.tokenizer, ctx.tok, cfg.model.seq_length))
    log.info("exported %s (%d tensors) -> %s", source, len(tensors), out)
    ctx.tracker.set_tags({"export_dir": str(out), "export_source": source})
    return {"export_dir": str(out), "export_source": source, "export_tensors": len(tensors)}
