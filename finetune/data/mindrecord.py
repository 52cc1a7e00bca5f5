"""Tokenized training examples <-> MindRecord shards (mindspore.mindrecord / mindspore.dataset)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model import IGNORE_ID

SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}


def encode_example(prompt: str, answer: str, tok, seq_length: int) -> tuple[list[int], list[int]] | None:
    """[bos] prompt answer [eos], padded to seq_length + 1 (the model shifts by one inside).

    Labels copy the answer tokens and EOS; prompt and padding get IGNORE_ID, so the loss is
    only on the answer. Returns None when the example does not fit."""
    p = [tok.bos_id] + tok.encode(prompt)
    a = tok.encode(answer) + [tok.eos_id]
    n = seq_length + 1
    if len(p) + len(a) > n:
        return None
    ids = p + a + [tok.pad_id] * (n - len(p) - len(a))
    labels = [IGNORE_ID] * len(p) + a + [IGNORE_ID] * (n - len(p) - len(a))
    return ids, labels


def write_shards(examples: list[tuple[list[int], list[int]]], path: Path, num_shards: int) -> list[Path]:
    """Write `examples` as `num_shards` MindRecord files (path, or path0..pathN-1 when sharded).

    Example i goes to shard i % num_shards only through MindSpore's own round robin; each
    data-parallel worker later reads all of them with num_shards/shard_id."""
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(file_name=str(path), shard_num=num_shards, overwrite=True)
    writer.add_schema(SCHEMA, "finetune examples")
    rows = [{"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(lab, np.int32)} for ids, lab in examples]
    for start in range(0, len(rows), 1000):
        writer.write_raw_data(rows[start:start + 1000])
    writer.commit()
    if num_shards == 1:
        return [path]
    return [path.with_name(f"{path.name}{i}") for i in range(num_shards)]


def read_shards(first_file: Path, num_shards: int = 1, shard_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All examples (of one data-parallel shard) as two int32 arrays [N, seq_length + 1]."""
    import mindspore.dataset as ds

    kwargs = {"num_shards": num_shards, "shard_id": shard_id} if num_shards > 1 else {}
    data = ds.MindDataset(str(first_file), columns_list=["input_ids", "labels"], shuffle=False, **kwargs)
    ids, labels = [], []
    for row in data.create_dict_iterator(output_numpy=True, num_epochs=1):
        ids.append(row["input_ids"])
        labels.append(row["labels"])
    if not ids:
        raise ValueError(f"{first_file}: MindRecord holds no examples")
    return np.stack(ids), np.stack(labels)
