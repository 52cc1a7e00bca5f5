"""The demo's own SQuAD-format reading set: generated (never copied from SQuAD), official layout,
new passages (not the corpus' text), and prompts the tiny model's window holds."""
import json

import pytest
import regex

from finetune.data import demo
from finetune.data.prepare import prepare, read_questions
from finetune.data.prepared import dataset_squad, load_meta
from finetune.data.squad import load_squad, squad_prompt, squad_prompt_ids
from finetune.data.tokenizer import load_tokenizer
from finetune.evaluation import metrics
from helpers import compose

WORLD = demo.build_world(160, seed=0)


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def tok():
    return load_tokenizer("tiktoken", None)


def _records(squad: dict, tmp_path) -> list[dict]:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    return load_squad(path)      # the official-layout reader evaluate uses


def test_reading_set_is_deterministic_and_seeded():
    a = demo.squad_dev(WORLD, 100, seed=0, avoid=set())
    assert a == demo.squad_dev(WORLD, 100, seed=0, avoid=set())
    assert a != demo.squad_dev(WORLD, 100, seed=1, avoid=set())
    assert demo.reading_texts(WORLD, 50, seed=0) == demo.reading_texts(WORLD, 50, seed=0)


def test_official_layout_unique_ids_and_answer_spans(tmp_path):
    squad = demo.squad_dev(WORLD, 101, seed=0, avoid=set())
    assert squad["version"] == "1.1"
    records = _records(squad, tmp_path)
    assert len(records) == 101                       # an odd count: the last passage has one question
    assert len({r["id"] for r in records}) == 101
    for paragraph in squad["data"][0]["paragraphs"]:
        context = paragraph["context"]
        lead, *sentences = context.split(". ")
        assert len(sentences) == demo.PASSAGE_SENTENCES and 1 <= len(paragraph["qas"]) <= 2
        words = [w for w in regex.findall(r"\w+", context) if w in WORLD]
        assert len({WORLD[w] for w in words}) == len(words) == demo.PASSAGE_SENTENCES   # one word per kind
        for qa in paragraph["qas"]:
            (answer,) = qa["answers"]
            start, text = answer["answer_start"], answer["text"]
            assert context[start:start + len(text)] == text and start < len(lead)   # a span of the lead
            assert text in demo.KINDS and context.count(text) == 1
            # the question asks about a word of the passage, and the answer is that word's kind
            (word,) = [w for w in words if f" {w}?" in qa["question"]]
            assert qa["question"] == demo.QA_QUESTION.format(w=word) and WORLD[word] == text
    # the gold answers score 100, a wrong word 0 (the official metric over this file)
    assert metrics.score_squad_records(records, {r["id"]: r["answers"][0] for r in records})["f1"] == 100.0
    first_kind = {r["id"]: r["context"].split()[1].strip(",") for r in records}  # the lead's first kind
    assert 20.0 < metrics.score_squad_records(records, first_kind)["exact_match"] < 50.0   # ~1/3: order is random


def test_reading_passages_are_not_the_corpus_text():
    docs = demo.corpus(WORLD, seed=0, num_practice=0, num_reading=300)
    reading = [d for d in docs if "\n\nQuestion: " in d]
    assert len(reading) == 300
    passage, qa = reading[0].split("\n\nQuestion: ")
    pairs = [tuple(x.split("\nAnswer: ")) for x in qa.split("\nQuestion: ")]
    assert len(pairs) == demo.PASSAGE_SENTENCES                            # every sentence asked about
    (question, answer), *_ = pairs
    assert reading[0].startswith(squad_prompt(passage, question) + f" {answer}\n")  # evaluation prompt + answer
    assert sorted(a for _, a in pairs) == sorted(WORLD[w] for w in passage.replace(".", "").split() if w in WORLD)
    avoid = demo.corpus_passages(docs)
    assert passage in avoid and len(avoid) > 250
    squad = demo.squad_dev(WORLD, 100, seed=0, avoid=avoid)
    contexts = [p["context"] for p in squad["data"][0]["paragraphs"]]
    assert len(set(contexts)) == len(contexts) == 50
    text = "\n".join(docs)
    assert not any(c in text for c in contexts)
    # ... and avoiding really skips: a set generated while avoiding its own passages has none of them
    again = demo.squad_dev(WORLD, 100, seed=0, avoid=set(contexts))
    assert not {p["context"] for p in again["data"][0]["paragraphs"]} & set(contexts)


def test_prompts_fit_the_tiny_window(tok, tmp_path):
    cfg = compose()
    records = _records(demo.squad_dev(WORLD, 100, seed=0, avoid=set()), tmp_path)
    ids, truncated = squad_prompt_ids(records, tok, cfg.model.seq_length, cfg.eval.squad.max_new_tokens)
    assert truncated == 0 and max(map(len, ids)) <= cfg.model.seq_length - cfg.eval.squad.max_new_tokens
    # the answer is one token, so max_new_tokens is plenty (the question words are not all in the
    # built-in vocabulary: adding them changes the tiny model's init and its multiple-choice result)
    assert all(len(tok.encode(" " + r["answers"][0])) == 1 for r in records)


def test_prepare_writes_the_reading_set(tmp_path, tok):
    out = prepare(compose([f"output_root={tmp_path}", "dataset.demo.num_reading=20", "dataset.demo.squad_questions=100"]), tok)
    assert dataset_squad(out) == out / "squad.json"
    assert load_meta(out)["squad_questions"] == 100
    records = load_squad(out / "squad.json")
    assert len(records) == 100
    corpus = "\n".join(json.loads((out / "corpus.json").read_text()))
    assert not any(r["context"] in corpus for r in records)
    assert corpus.count("\n\nQuestion: ") == 20                           # dataset.demo.num_reading
    assert dataset_squad(tmp_path) is None                                 # a folder without one
    assert read_questions(compose(["dataset.demo.squad_questions=0"]).dataset)[2] is None
    from finetune.config.checks import resolve
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.demo.general_reading: expected >= 0, got -2"):
        resolve(compose(["dataset.demo.general_reading=-2"]))
    with pytest.raises(ConfigError, match=r"dataset.demo.num_reading: expected >= 0, got -1"):
        resolve(compose(["dataset.demo.num_reading=-1"]))
