"""Tokenized training examples <-> MindRecord shards (mindspore.mindrecord / mindspore.dataset)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.data.records import IGNORE_ID

SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}


def encode_example(prompt: str, answer: str, tok, seq_length: int) -> tuple[list[int], list[int]] | None:
    """[bos] prompt answer [eos] (or the chat turn around the prompt, the answer as the assistant's
    reply: tok.wrap, tok.answer_ids), padded to seq_length + 1 (the model shifts by one inside).

    Labels copy the answer tokens and EOS; prompt and padding get IGNORE_ID, so the loss is
    only on the answer. Returns None when the example does not fit."""
    p = tok.wrap(tok.encode(prompt))
    a = tok.answer_ids(answer)
    n = seq_length + 1
    if len(p) + len(a) > n:
        return None
    ids = p + a + [tok.pad_id] * (n - len(p) - len(a))
    labels = [IGNORE_ID] * len(p) + a + [IGNORE_ID] * (n - len(p) - len(a))
    return ids, labels


# Fixed seed of the one-time shuffle before sharding: batches mix subjects, and the order does
# not depend on the run's seed, so one prepared-data cache serves every seed.
SHUFFLE_SEED = 1234
# After the shuffle, rows are sorted by length within chunks of this many rows, so that consecutive
# rows (a batch) have similar lengths and a batch cut to its length bucket holds little padding
# (batches.bucket). The epoch's batch order is still shuffled (train.batch_order).
LENGTH_CHUNK = 1024


def shard_path(path: Path, num_shards: int, shard_id: int) -> Path:
    return path if num_shards == 1 else path.with_name(f"{path.name}{shard_id}")


def length_grouped(order: np.ndarray, lengths: list[int], chunk: int = LENGTH_CHUNK) -> np.ndarray:
    """`order` with each run of `chunk` consecutive entries sorted by length (stable)."""
    return np.concatenate([sorted(order[i:i + chunk], key=lambda j: lengths[j]) for i in range(0, len(order), chunk)]
                          ).astype(np.int64) if len(order) else order


def write_shards(examples: list[tuple[list[int], list[int]]], path: Path, num_shards: int,
                 pad_id: int | None = None) -> list[Path]:
    """Shuffle `examples` once (SHUFFLE_SEED), sort by length within chunks (given pad_id: the
    length is the non-pad tokens), then write row i to shard i % num_shards, one stand-alone
    MindRecord file per data-parallel rank (path, or path0..pathN-1).

    Round robin makes global batch k (rows k*G .. k*G+G-1 of the shuffled list, G = global
    batch) the union of rows k*b .. k*b+b-1 of every shard (b = G / num_shards), so a run on
    any number of devices sees the same batches. The last len % num_shards rows are dropped
    so that every rank has the same number of steps (a rank with one more would wait forever)."""
    from mindspore.mindrecord import FileWriter

    order = length_grouped(np.random.default_rng(SHUFFLE_SEED).permutation(len(examples)),
                           [len(e[0]) - e[0].count(pad_id) if pad_id is not None else 0 for e in examples])
    usable = len(order) - len(order) % num_shards
    rows = [{"input_ids": np.asarray(examples[i][0], np.int32), "labels": np.asarray(examples[i][1], np.int32)}
            for i in order[:usable]]
    files = []
    for r in range(num_shards):
        f = shard_path(path, num_shards, r)
        writer = FileWriter(file_name=str(f), shard_num=1, overwrite=True)
        writer.add_schema(SCHEMA, "finetune examples")
        shard = rows[r::num_shards]
        for start in range(0, len(shard), 1000):
            writer.write_raw_data(shard[start:start + 1000])
        writer.commit()
        files.append(f)
    return files


def read_shards(path: Path, num_shards: int = 1, shard_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The examples of one data-parallel rank's shard as two int32 arrays [N, seq_length + 1]."""
    import signal
    import threading

    import mindspore.dataset as ds

    f = shard_path(Path(path), num_shards, shard_id)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    data = ds.MindDataset(str(f), columns_list=["input_ids", "labels"], shuffle=False)
    ids, labels = [], []
    for row in data.create_dict_iterator(output_numpy=True, num_epochs=1):
        ids.append(row["input_ids"])
        labels.append(row["labels"])
    if main_thread and previous is not None:
        # MindSpore's dataset engine installs a C-level SIGINT handler that ends the process (exit 0,
        # no clean-up: measured); Ctrl-C must stay Python's KeyboardInterrupt, which marks the run KILLED.
        signal.signal(signal.SIGINT, previous)
    if not ids:
        raise ValueError(f"{f}: MindRecord holds no examples")
    return np.stack(ids), np.stack(labels)


def read_all_shards(path: Path, num_shards: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a sharded MindRecord in the one-shard order (write_shards dealt row i to
    shard i % num_shards): what packed training reads on every rank."""
    shards = [read_shards(path, num_shards, r) for r in range(num_shards)]
    n = sum(len(ids) for ids, _ in shards)
    ids = np.empty((n, shards[0][0].shape[1]), np.int32)
    labels = np.empty_like(ids)
    for r, (i, l) in enumerate(shards):
        ids[r::num_shards], labels[r::num_shards] = i, l
    return ids, labels
