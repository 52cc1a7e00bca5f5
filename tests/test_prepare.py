"""Stage prepare: questions -> Alpaca JSON -> MindRecord shards, cached by content hash."""
import json
import re

import numpy as np
import pytest

from finetune.data.mindrecord import read_shards
from finetune.data.prepare import cache_dir, prepare
from finetune.data.prepared import load_meta, load_questions
from finetune.data.records import IGNORE_ID, DataError
from finetune.data.tokenizer import load_tokenizer
from helpers import compose


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
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
    # 360 questions + the demo's 120 reading examples (dataset.demo.general_reading), one shuffled file
    assert meta["general_examples"] == 120 and len(json.loads((out / "alpaca" / "general.json").read_text())) == 120
    assert ids.shape == labels.shape == (480, cfg.model.seq_length + 1)
    # Loss only on the answer: exactly two labelled tokens per row (the letter or kind, and EOS),
    # and they equal the input tokens at the same positions.
    labelled = labels != IGNORE_ID
    assert (labelled.sum(axis=1) == 2).all()
    assert (labels[labelled] == ids[labelled]).all()
    letters = [tok.encode(f" {c}")[0] for c in "ABCD"]
    kinds = [tok.encode(f" {k}")[0] for k in ("fruit", "animal", "tool", "colour")]
    first = labels[np.arange(len(labels)), labelled.argmax(axis=1)]
    assert np.isin(first, letters).sum() == 360 and np.isin(first, kinds).sum() == 120
    assert set(first[:40].tolist()) & set(letters) and set(first[:40].tolist()) & set(kinds)   # mixed, not appended
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
    # Stable: chosen by a hash of the question id alone, so the same on every machine, for any seed
    # and any subject selection (values measured once, 2026-11-28; all of MMLU's test: 2,876 of 14,042).
    assert len(held) == 19 + 23
    assert sorted(i for i in held if "abstract_algebra" in i)[:3] == [
        "mmlu/test/abstract_algebra/19", "mmlu/test/abstract_algebra/24", "mmlu/test/abstract_algebra/27"]
    other_seed = prepare(compose(overrides + ["seed=7"]), tok)
    assert other_seed != out and {q.id for q in load_questions(other_seed, "eval")} == held
    anatomy = prepare(compose([o for o in overrides if not o.startswith("dataset.subjects")]
                              + ["dataset.subjects=[anatomy]"]), tok)
    assert {q.id for q in load_questions(anatomy, "eval")} == {i for i in held if "/anatomy/" in i}


def test_summary_counts_the_repeated_questions_left_out_of_eval(tmp_path, tok, shared):
    """summary.json's eval_dropped_in_train / eval_dropped_repeated (the prepare stage's figures) on
    real MMLU subjects whose test split holds copies of questions (same question and options up to
    case and whitespace): counted here from the CSV rows and the prepared training split."""
    from types import SimpleNamespace

    from finetune.data.mmlu import read_mmlu
    from finetune.stages.prepare import prepare_stage

    subjects = ["clinical_knowledge", "college_medicine", "college_physics"]
    out = prepare(compose([f"output_root={tmp_path}", "dataset=mmlu", f"dataset.path={shared / 'data' / 'mmlu'}",
                           f"dataset.subjects=[{','.join(subjects)}]", "model.seq_length=512"]), tok)
    figures = prepare_stage(SimpleNamespace(prepared=out))

    def key(q):
        return tuple(" ".join(t.lower().split()) for t in (q.question, *q.choices))

    rows = [q for q in read_mmlu(shared / "data" / "mmlu")["test"] if q.subject in subjects]
    train = {q.id for q in load_questions(out, "train")}
    in_train = {key(q) for q in rows if q.id in train}
    held = [q for q in rows if q.id not in train]          # the holdout, before duplicates are left out
    of_train = [q for q in held if key(q) in in_train]
    rest = [key(q) for q in held if key(q) not in in_train]
    repeated = len(rest) - len(set(rest))
    assert (len(of_train), repeated) == (25, 6)             # measured: clinical_knowledge and college_medicine share questions
    assert figures["eval_dropped_in_train"] == len(of_train)
    assert figures["eval_dropped_repeated"] == repeated
    assert figures["eval_questions_total"] == len(load_questions(out, "eval")) == len(held) - len(of_train) - repeated


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


# ------------------------------------------------------------------- general records (rehearsal)

def test_general_records_are_mixed_into_training(tmp_path, tok):
    """dataset.general.path: Alpaca records appended to the training MindRecord, loss on their output."""
    general = [{"instruction": f"Passage {i}.", "input": "Question: What is it?\nAnswer:", "output": " fruit"}
               for i in range(30)]
    path = tmp_path / "general.json"
    path.write_text(json.dumps(general))
    base = [f"output_root={tmp_path}", "dataset.demo.general_reading=0"]
    out = prepare(compose(base + [f"dataset.general.path={path}", "dataset.general.limit=20"]), tok)
    meta = load_meta(out)
    assert meta["train_questions"] == 360 and meta["general_examples"] == 20 and meta["train_examples"] == 380
    kept = json.loads((out / "alpaca" / "general.json").read_text())
    assert len(kept) == 20 and kept == [r for r in general if r in kept]         # a sample, in file order
    ids, labels = read_shards(out / "mindrecord" / "train.mindrecord")
    assert len(ids) == 380
    fruit = tok.encode(" fruit")[0]
    answers = labels[np.arange(len(labels)), (labels != IGNORE_ID).argmax(axis=1)]
    assert (answers == fruit).sum() == 20                                       # the general rows' targets
    # the file's bytes are part of the cache key: an edited file is prepared again
    path.write_text(json.dumps(general[:25]))
    assert cache_dir(compose(base + [f"dataset.general.path={path}", "dataset.general.limit=20"]), tok) != out


def test_demo_generates_its_own_general_reading(tmp_path, tok):
    cfg = compose([f"output_root={tmp_path}", "dataset.demo.general_reading=40", "dataset.demo.squad_questions=60"])
    out = prepare(cfg, tok)
    assert load_meta(out)["general_examples"] == 40
    general = json.loads((out / "alpaca" / "general.json").read_text())
    squad = json.loads((out / "squad.json").read_text())
    dev = {p["context"] for p in squad["data"][0]["paragraphs"]}
    assert len({r["instruction"] for r in general}) == 40 and not {r["instruction"] for r in general} & dev
    assert all(r["output"].strip() in ("fruit", "animal", "tool", "colour") for r in general)


@pytest.mark.parametrize(("content", "needle"), [
    ('{"instruction": "x"}', "expected a JSON list of Alpaca records, got dict"),
    ('[{"instruction": "x", "output": " A"}, {"instruction": "y"}]',
     "record [1]: expected an object with string 'instruction' and 'output'"),
    ('[{"instruction": "x", "input": 3, "output": " A"}]', "record [0]: 'input' must be a string"),
    ('[{"instruction": ', "not a JSON file"),
])
def test_malformed_general_file_is_one_line(tmp_path, tok, content, needle):
    path = tmp_path / "general.json"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"dataset.general.path: {path}: ") + ".*" + re.escape(needle)):
        prepare(compose([f"output_root={tmp_path}", f"dataset.general.path={path}"]), tok)
    assert not list(tmp_path.glob("cache/data/*"))
