"""The base model as an artifact: one function, `resolve_base`, turns the `model` group into a
MindSpore checkpoint file that every stage loads. Run once per job (before msrun, in a
multi-device job), logged once.

  model.checkpoint = a .ckpt     -> that file
  model.checkpoint = an HF folder -> converted once, cached under output_root/cache/converted/
  model.checkpoint = a .gguf      -> dequantized once, cached there too
  model.checkpoint = null        -> random init from `seed`, pretrained on the dataset's text
                                    corpus when model.pretrain.epochs > 0 (the demo), cached under
                                    output_root/cache/base/ by a hash of everything that shapes it
Cached files are written to a temporary name and renamed, so a crash never leaves one a later run
would trust.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from finetune.config.gguf_config import is_gguf
from finetune.config.hf_config import is_hf_dir
from finetune.errors import ModelError
from finetune.model.checkpoint import save_checkpoint
from finetune.model.gguf import load_gguf_state
from finetune.model.hf import load_hf_state
from finetune.model.layout import to_mindformers
from finetune.model.llama import build_model, vocab_size_for

log = logging.getLogger(__name__)


def resolve_base(cfg, tok, prepared: Path, tracker) -> tuple[Path, str]:
    """(checkpoint file of the base weights, how it was obtained: checkpoint | converted |
    pretrained | random-init; '(cached)' appended when taken from the cache)."""
    ckpt = cfg.model.checkpoint
    if ckpt and is_hf_dir(ckpt):
        return convert_hf(Path(ckpt), cfg)
    if is_gguf(ckpt):
        return convert_gguf(Path(ckpt), cfg)
    if ckpt:
        if not Path(ckpt).is_file():
            raise ModelError(f"model.checkpoint: {ckpt} not found (a MindSpore .ckpt or a Hugging Face folder)")
        return Path(ckpt), "checkpoint"
    corpus_file = prepared / "corpus.json"
    corpus = json.loads(corpus_file.read_text(encoding="utf-8")) \
        if cfg.model.pretrain.epochs > 0 and corpus_file.is_file() else []
    path = cache_path(cfg, tok, corpus)
    how = "pretrained" if corpus else "random-init"
    if not corpus:
        log.warning("model: random init (no checkpoint%s); expect chance-level accuracy",
                    "" if cfg.model.pretrain.epochs <= 0 else ", and this dataset has no text corpus to pretrain on")
    if path.is_file():
        log.info("base model: %s base from the cache, %s", how, path)
        return path, f"{how} (cached)"
    net = build_model(cfg.model, cfg.hardware, tok, cfg.model.pretrain.batch_size, seed=cfg.seed)
    if corpus:
        pretrain(net, corpus, cfg, tok, tracker)
    save_checkpoint([(p.name, p) for p in net.get_parameters()], path)
    log.info("base model: %s base saved to %s", how, path)
    return path, how


def cache_path(cfg, tok, corpus: list[str]) -> Path:
    """output_root/cache/base/<model>-<hash of model config, dtype, seed, tokenizer, corpus>.ckpt"""
    key = json.dumps({"model": OmegaConf.to_container(cfg.model, resolve=True),
                      "hardware_dtype": str(cfg.hardware.param_init_type), "seed": cfg.seed, "tokenizer": tok.name,
                      "vocab": vocab_size_for(cfg.model, tok),
                      "corpus": hashlib.sha256("\n".join(corpus).encode()).hexdigest()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.output_root).resolve() / "cache" / "base" / f"{cfg.model.name}-{digest}.ckpt"


def pack_corpus(docs: list[str], tok, seq_length: int) -> np.ndarray:
    """bos doc eos bos doc eos ... cut into rows of seq_length + 1 tokens (nanoGPT-style packing)."""
    stream = []
    for d in docs:
        stream += tok.prefix + tok.encode(d) + [tok.eos_id]
    n = len(stream) // (seq_length + 1)
    return np.asarray(stream[:n * (seq_length + 1)], np.int32).reshape(n, seq_length + 1)


def pretrain(net, corpus: list[str], cfg, tok, tracker) -> None:
    """Full-parameter next-token training of a random-init base on the corpus (the demo's 'pretraining
    knowledge'), with the same jit step and loop as LoRA training; step metrics as pretrain_*."""
    from finetune.training.loop import Schedule, TrainingJob, row_feed, run_steps

    pre = cfg.model.pretrain
    rows = pack_corpus(corpus, tok, cfg.model.seq_length)
    log.info("base model: pretraining %s on %d corpus rows for %d epochs (cached afterwards)",
             cfg.model.name, len(rows), pre.epochs)
    opt_cfg = OmegaConf.merge(cfg.optimizer, {"learning_rate": pre.learning_rate})
    stats = run_steps(TrainingJob(net, row_feed(rows, rows, tok.pad_id, sparse=False),
                                  Schedule(batch_size=pre.batch_size, epochs=pre.epochs, seed=cfg.seed),
                                  opt_cfg, cfg.hardware, tracker, metric_prefix="pretrain_", desc="pretrain base"))
    tracker.log_metrics({"pretrain_loss_last": stats["loss_last"]})


def convert_gguf(file: Path, cfg) -> tuple[Path, str]:
    """A GGUF file's weights dequantized to a float32 MindFormers-named checkpoint, converted once and
    cached (keyed by the file's path, size and time)."""
    if not file.is_file():
        raise ModelError(f"model.checkpoint: GGUF file {file} not found")
    st = file.stat()
    key = hashlib.sha256(f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return _converted(file, f"{file.stem}-{key}", load_gguf_state, cfg)


def convert_hf(folder: Path, cfg) -> tuple[Path, str]:
    """A Hugging Face folder's weights as a MindFormers-named checkpoint, converted once and cached
    (keyed by the folder's file names, sizes and times). Whether every tensor the model needs is
    there is checked when a stage loads it (model.load_weights)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return _converted(folder, f"{folder.name}-{h.hexdigest()[:12]}", load_hf_state, cfg)


def _converted(source: Path, name: str, load, cfg) -> tuple[Path, str]:
    """output_root/cache/converted/<name>.ckpt: load(source) (Hugging Face tensor names) renamed to
    MindFormers' and saved, unless it is there already."""
    cached = Path(cfg.output_root).resolve() / "cache" / "converted" / f"{name}.ckpt"
    if cached.is_file():
        log.info("base model: converted %s from the cache, %s", source, cached)
        return cached, "converted (cached)"
    state = to_mindformers(load(source), cfg.model.num_layers, cfg.model.tie_word_embeddings)
    save_checkpoint(list(state.items()), cached)
    log.info("base model: converted %s -> %s", source, cached)
    return cached, "converted"
