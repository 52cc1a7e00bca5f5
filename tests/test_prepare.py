"""Stage prepare: questions -> Alpaca JSON -> MindRecord shards, cached by content hash."""
import json

import numpy as np
import pytest

from conftest import compose
from finetune.data.mindrecord import read_shards
from finetune.data.records import DataError
from finetune.model import IGNORE_ID
from finetune.prepare import cache_dir, load_meta, load_questions, prepare
from finetune.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiktoken", None)


def test_demo_prepare_writes_alpaca_mindrecord_and_is_cached(tmp_path, tok):
    cfg = compose([f"output_root={tmp_path}"])
    out = prepare(cfg, tok)
    meta = load_meta(out)
    assert meta["dataset_rows"] == {"dev": 15, "test": 120, "train": 360}
    alpaca = json.loads((out / "alpaca" / "train.json").read_text())
    assert len(alpaca) == 360 and set(alpaca[0]) >= {"instruction", "input", "output"}
    assert alpaca[0]["output"] in {" A", " B", " C", " D"}

    ids, labels = read_shards(out / "mindrecord" / "train.mindrecord")
    assert ids.shape == labels.shape == (360, cfg.model.seq_length + 1)
    # Loss only on the answer: exactly two labelled tokens per row (the letter and EOS), and
    # they equal the input tokens at the same positions.
    labelled = labels != IGNORE_ID
    assert (labelled.sum(axis=1) == 2).all()
    assert (labels[labelled] == ids[labelled]).all()
    letters = {tok.encode(f" {c}")[0] for c in "ABCD"}
    first = labels[np.arange(len(labels)), labelled.argmax(axis=1)]
    assert set(first.tolist()) == letters
    assert ids[0, 0] == tok.bos_id

    # Same config -> same folder, not rebuilt.
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare(cfg, tok) == out and (out / "meta.json").stat().st_mtime_ns == stamp
    # Different seq_length -> a different cache entry.
    assert cache_dir(compose([f"output_root={tmp_path}", "model.seq_length=80"]), tok) != out
    assert not list(out.parent.glob("*.tmp-*"))


def test_holdout_split_is_disjoint_and_stable(tmp_path, tok, shared):
    overrides = [f"output_root={tmp_path}", "dataset=mmlu", f"dataset.path={shared / 'data' / 'mmlu'}",
                 "dataset.subjects=[abstract_algebra,anatomy]", "model.seq_length=512"]
    out = prepare(compose(overrides), tok)
    train = {q.id for q in load_questions(out, "train")}
    held = {q.id for q in load_questions(out, "eval")}
    assert train and held and not train & held
    assert len(train) + len(held) == 100 + 135      # both subjects' test rows
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3   # holdout_fraction 0.2
    assert load_meta(out)["dataset_rows"] == {"dev": 285, "test": 14042}   # all rows parsed


def test_errors_are_specific(tmp_path, tok, shared):
    with pytest.raises(DataError, match="model.seq_length=8"):
        prepare(compose([f"output_root={tmp_path}", "model.seq_length=8"]), tok)
    with pytest.raises(DataError, match="dataset.subjects"):
        prepare(compose([f"output_root={tmp_path}", "dataset.subjects=[astrology]"]), tok)
    with pytest.raises(DataError, match="dataset.train_split='val'"):
        prepare(compose([f"output_root={tmp_path}", "dataset=mmlu", f"dataset.path={shared / 'data' / 'mmlu'}",
                         "dataset.train_split=val"]), tok)
    # nothing half-written is left behind
    assert not list(tmp_path.glob("cache/data/*"))
