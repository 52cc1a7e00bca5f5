"""Stage `prepare`: exam files -> questions -> Alpaca JSON -> tokens -> MindRecord shards.

Output goes to a cache folder named by a hash of everything that affects it (the input files'
bytes, the dataset config, the tokenizer, seq_length, shard count), so a second run with the
same inputs reuses it. The folder is built under a temporary name and renamed when complete:
a crash never leaves a folder that a later run would trust.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from finetune.data import demo, prompts
from finetune.data.cmmlu import read_cmmlu
from finetune.data.mindrecord import encode_example, write_shards
from finetune.data.mmlu import read_mmlu
from finetune.data.prepared import CORPUS_FILE, GENERAL, META, SQUAD_FILE, TRAIN_RECORDS, alpaca_file, questions_file
from finetune.data.records import DataError, Question, read_bytes
from finetune.data.tokenizer import tokenizer_fingerprint

log = logging.getLogger(__name__)

# Bump when the prepared layout or prompt/tokenization logic changes, to invalidate caches.
FORMAT_VERSION = 6   # 2: the demo's SQuAD-format reading set (squad.json); 3: general records mixed in;
# 4: training rows sorted by length within chunks (data/mindrecord.length_grouped); 5: question and
# option texts stripped; CMMLU headers name the subject in Chinese; 6: eval questions that training
# (or eval itself) already has are left out
READERS = {"mmlu": read_mmlu, "cmmlu": read_cmmlu}


def read_questions(ds) -> tuple[dict[str, list[Question]], list[str], dict | None, list[dict]]:
    """(split -> questions, base-training corpus, SQuAD-format reading set or None, general-ability
    Alpaca records to mix into training). Only the demo has a corpus and a reading set of its own;
    dataset.general.path gives any dataset general records (the demo can generate its own)."""
    if ds.name == "demo":   # the demo's settings and the other datasets' path: checked at start-up (checks.py)
        d = ds.demo
        world = demo.build_world(d.num_words, d.seed)
        docs = demo.corpus(world, d.seed, d.num_practice, d.num_reading)
        squad = demo.squad_dev(world, d.squad_questions, d.seed, avoid=demo.corpus_passages(docs)) \
            if d.squad_questions else None
        dev_passages = {p["context"] for a in squad["data"] for p in a["paragraphs"]} if squad else set()
        general = demo.reading_alpaca(world, d.general_reading, d.seed, avoid=dev_passages) \
            if d.general_reading and not ds.general.path else []
        return demo.questions(world, d.seed, d.test_fraction, d.dev_per_subject), docs, squad, general
    return READERS[ds.name](ds.path, ds.encoding), [], None, []


def general_records(ds, generated: list[dict], seed: int) -> list[dict]:
    """The general-ability records mixed into training: dataset.general.path's (or the demo's
    generated ones), at most dataset.general.limit of them (a seeded sample, kept in file order)."""
    records = prompts.read_alpaca_json(ds.general.path, "dataset.general.path", require_output=True) \
        if ds.general.path else generated
    limit = ds.general.limit   # >= 0 or null (checks.py)
    if limit is not None:
        if len(records) > limit:
            keep = sorted(random.Random(seed).sample(range(len(records)), limit))
            records = [records[i] for i in keep]
    return records


def question_key(q: Question) -> str:
    """What makes two questions the same for leakage: question and option texts, case and runs of
    whitespace ignored (the CSVs hold copies that differ only in those)."""
    return "\x1f".join(" ".join(t.split()).casefold() for t in (q.question, *q.choices))


def drop_duplicates(train: list[Question], evalq: list[Question]) -> tuple[list[Question], int, int]:
    """(eval questions, how many were dropped because training has the same question, how many
    because eval already had it). Repeats within training are kept: they only weigh more."""
    in_train = {question_key(q) for q in train}
    kept, seen, of_train, repeated = [], set(), 0, 0
    for q in evalq:
        key = question_key(q)
        if key in in_train:
            of_train += 1
        elif key in seen:
            repeated += 1
        else:
            seen.add(key)
            kept.append(q)
    return kept, of_train, repeated


def _holdout(q: Question, fraction: float) -> bool:
    """Stable pseudo-random membership from the question id (same answer on every machine)."""
    h = int.from_bytes(hashlib.sha256(q.id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def select_splits(ds, splits: dict[str, list[Question]], seed: int) -> tuple[dict[str, list[Question]], dict]:
    """({'train', 'eval', 'dev'} question lists according to the dataset config, {how many eval
    questions were left out as duplicates: eval_dropped_in_train, eval_dropped_repeated})."""
    for key in ("train_split", "eval_split", "dev_split"):
        if ds[key] not in splits:
            raise DataError(f"dataset.{key}={ds[key]!r}: no such split in {ds.path or ds.name} "
                            f"(found {', '.join(sorted(splits))})")
    if ds.subjects:
        known = {q.subject for qs in splits.values() for q in qs}
        unknown = sorted(set(ds.subjects) - known)
        if unknown:
            raise DataError(f"dataset.subjects: unknown subject(s) {unknown}; known e.g. {sorted(known)[:5]}")
        keep = set(ds.subjects)
        splits = {k: [q for q in v if q.subject in keep] for k, v in splits.items()}
    train, evalq = splits[ds.train_split], splits[ds.eval_split]
    if ds.train_split == ds.eval_split:   # holdout_fraction is in (0, 1) (checks.py)
        evalq = [q for q in train if _holdout(q, ds.holdout_fraction)]
        train = [q for q in train if not _holdout(q, ds.holdout_fraction)]
    if ds.max_train_questions is not None and len(train) > ds.max_train_questions:
        train = sorted(random.Random(seed).sample(train, ds.max_train_questions), key=lambda q: q.id)
    evalq, of_train, repeated = drop_duplicates(train, evalq)
    if of_train or repeated:
        log.warning("prepare: %d eval questions also in training and %d repeated within eval are left out "
                    "of evaluation (same question and options; %d eval questions remain)", of_train, repeated,
                    len(evalq))
    if not train or not evalq:
        raise DataError(f"dataset: empty selection (train {len(train)}, eval {len(evalq)} questions); "
                        f"check dataset.subjects / splits")
    return ({"train": train, "eval": evalq, "dev": splits[ds.dev_split]},
            {"eval_dropped_in_train": of_train, "eval_dropped_repeated": repeated})


def _encode(pairs: list[tuple[str, str]], tok, seq_length: int) -> tuple[list, int]:
    """(prompt, target) pairs -> the encoded examples that fit seq_length, and how many did not."""
    encoded = [encode_example(prompt, target, tok, seq_length) for prompt, target in pairs]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def _input_fingerprint(ds) -> str:
    """sha256 over the bytes of every input file, dataset.general.path's included (the demo is
    generated: its config is enough)."""
    h = hashlib.sha256()
    if ds.name in READERS and ds.path:
        root = Path(ds.path)
        for f in sorted(root.rglob("*.csv")):
            h.update(str(f.relative_to(root)).encode())
            h.update(read_bytes(f))
    if ds.general.path and Path(ds.general.path).is_file():
        h.update(b"general:" + Path(ds.general.path).read_bytes())
    return h.hexdigest()


def cache_dir(cfg, tok) -> Path:
    key = json.dumps({
        "format": FORMAT_VERSION,
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "inputs": _input_fingerprint(cfg.dataset),
        "tokenizer": tokenizer_fingerprint(tok),
        "seq_length": cfg.model.seq_length,
        "num_shards": cfg.parallel.data_parallel,
        "seed": cfg.seed,
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.output_root).resolve() / "cache" / "data" / f"{cfg.dataset.name}-{digest}"


def prepare(cfg, tok) -> Path:
    """Build (or reuse) the prepared-data folder for this config; returns its path."""
    out = cache_dir(cfg, tok)
    if (out / META).is_file():
        log.info("prepared data: reusing %s", out)
        return out
    ds = cfg.dataset
    splits, corpus, squad, generated = read_questions(ds)
    chosen, dropped = select_splits(ds, splits, cfg.seed)
    general = general_records(ds, generated, cfg.seed)

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        questions_file(tmp, "train").parent.mkdir(parents=True)
        for name, qs in chosen.items():
            prompts.write_alpaca_json([prompts.to_alpaca(q, ds.style) for q in qs], alpaca_file(tmp, name))
            questions_file(tmp, name).write_text(
                json.dumps([dataclasses.asdict(q) for q in qs], ensure_ascii=False, indent=0), encoding="utf-8")

        examples, too_long = _encode([(prompts.build_prompt(q, ds.style), prompts.target(q, ds.style))
                                      for q in chosen["train"]], tok, cfg.model.seq_length)
        if not examples:
            raise DataError(f"model.seq_length={cfg.model.seq_length}: every one of {len(chosen['train'])} training "
                            f"questions is longer; raise it")
        if too_long:
            log.warning("prepare: %d of %d training questions exceed model.seq_length=%d tokens and are left out",
                        too_long, len(chosen["train"]), cfg.model.seq_length)
        general_long = 0
        if general:   # mixed into the same shuffled MindRecord: every batch rehearses a little of it
            prompts.write_alpaca_json(general, alpaca_file(tmp, GENERAL))
            general_examples, general_long = _encode([(prompts.alpaca_prompt(r), r["output"]) for r in general],
                                                     tok, cfg.model.seq_length)
            examples += general_examples
            if general_long:
                log.warning("prepare: %d of %d general records exceed model.seq_length=%d tokens and are left out",
                            general_long, len(general), cfg.model.seq_length)
        (tmp / TRAIN_RECORDS).parent.mkdir()
        write_shards(examples, tmp / TRAIN_RECORDS, cfg.parallel.data_parallel, tok.pad_id)
        if corpus:
            (tmp / CORPUS_FILE).write_text(json.dumps(corpus, ensure_ascii=False, indent=0), encoding="utf-8")
        if squad:
            (tmp / SQUAD_FILE).write_text(json.dumps(squad, ensure_ascii=False, indent=0), encoding="utf-8")

        meta = {
            "dataset": ds.name,
            "dataset_rows": {split: len(qs) for split, qs in sorted(splits.items())},
            "train_questions": len(chosen["train"]),
            "train_examples": len(examples),
            "train_too_long": too_long,
            "general_examples": len(general) - general_long,
            "eval_questions": len(chosen["eval"]),
            **dropped,
            "dev_questions": len(chosen["dev"]),
            "subjects": sorted({q.subject for q in chosen["eval"]}),
            "num_shards": cfg.parallel.data_parallel,
            "seq_length": cfg.model.seq_length,
            "tokenizer": tok.name,
            "has_corpus": bool(corpus),
            "squad_questions": sum(len(p["qas"]) for a in squad["data"] for p in a["paragraphs"]) if squad else 0,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-built folder behind
        raise
    log.info("prepared data: %s (%d training examples, %d eval questions)", out, len(examples), len(chosen["eval"]))
    return out


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place. Another job may have published the same content first
    (same cache key): then its folder is kept, never deleted under its readers, and ours discarded.
    A folder without meta.json is an older crash's leftover and is replaced."""
    if out.exists() and not (out / META).is_file():
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / META).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


