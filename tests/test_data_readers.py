"""MMLU / CMMLU readers: real data in ../shared (skipped if absent) and bad inputs in tmp_path."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from finetune.data.cmmlu import read_cmmlu
from finetune.data.mmlu import read_mmlu
from finetune.data.records import DataError, Question, read_text
from helpers import shared_path


def _data(name: str) -> Path:
    return shared_path("data", name)


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def mmlu() -> dict[str, list[Question]]:
    return read_mmlu(_data("mmlu"))


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def cmmlu() -> dict[str, list[Question]]:
    return read_cmmlu(_data("cmmlu"))


def _by_id(questions: list[Question]) -> dict[str, Question]:
    return {q.id: q for q in questions}


# ---------------------------------------------------------------- real data


def test_mmlu_counts(mmlu):
    assert {k: len(v) for k, v in mmlu.items()} == {"dev": 285, "test": 14042}
    assert len({q.subject for q in mmlu["test"]}) == 57
    assert {q.subject for q in mmlu["dev"]} == {q.subject for q in mmlu["test"]}
    for qs in mmlu.values():
        keys = [(q.subject, int(q.id.rsplit("/", 1)[1])) for q in qs]
        assert keys == sorted(keys)
        assert len({q.id for q in qs}) == len(qs)


def test_mmlu_spot_check(mmlu):
    q = _by_id(mmlu["test"])["mmlu/test/abstract_algebra/0"]
    assert q.subject == "abstract_algebra"
    assert q.question == "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    assert q.choices == ("0", "4", "2", "6")  # numbers stay strings
    assert q.answer == "B"
    assert q.source.endswith("mmlu/test/abstract_algebra_test.csv:1")
    # "None" is legitimate option text, not a missing value.
    q = _by_id(mmlu["test"])["mmlu/test/electrical_engineering/41"]
    assert q.choices == ("SRAM", "DRAM", "Both SRAM and DRAM", "None")
    assert q.answer == "B"
    assert q.source.endswith("electrical_engineering_test.csv:42")


def test_mmlu_multiline_rows_report_editor_lines(mmlu):
    dev = _by_id(mmlu["dev"])
    q = dev["mmlu/dev/high_school_european_history/1"]
    assert q.question.startswith("This question refers to the following information.\nRead the following excerpt.\n")
    assert q.answer == "A"
    # Row 0 spans lines 1-12, so row 1 starts on line 13 in an editor.
    assert q.source.endswith("high_school_european_history_dev.csv:13")
    assert dev["mmlu/dev/high_school_european_history/4"].source.endswith(":37")


def test_cmmlu_counts(cmmlu):
    assert {k: len(v) for k, v in cmmlu.items()} == {"dev": 335, "test": 11582}
    assert len({q.subject for q in cmmlu["test"]}) == 67
    assert {q.subject for q in cmmlu["dev"]} == {q.subject for q in cmmlu["test"]}


def test_cmmlu_spot_check(cmmlu):
    q = _by_id(cmmlu["dev"])["cmmlu/dev/agronomy/0"]
    assert q == Question(
        id="cmmlu/dev/agronomy/0",
        subject="agronomy",
        question="肉牛屠宰后，胴体的哪个部位肉质较好",
        choices=("胸", "腹", "大腿", "小腿"),
        answer="C",
        source=q.source,
    )
    assert q.source.endswith("cmmlu/dev/agronomy.csv:2")  # line 1 is the header
    q = _by_id(cmmlu["test"])["cmmlu/test/world_religions/159"]
    assert q.question == "在罗马宗教生活和文化生活什么紧密联系在一起。"
    assert q.choices == ("个人生活", "日常生活", "祭祀活动", "政治生活")
    assert q.answer == "D"
    assert q.source.endswith("world_religions.csv:161")


# ---------------------------------------------------------------- bad inputs

GOOD = "What is 1+1?,1,2,3,NA,B\n"


def _mmlu_tree(root: Path, test_text: str | bytes = GOOD, dev_text: str = GOOD) -> Path:
    for split, text in (("dev", dev_text), ("test", test_text)):
        (root / split).mkdir(parents=True, exist_ok=True)
        f = root / split / f"math_{split}.csv"
        f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return root


CMMLU_HEADER = ",Question,A,B,C,D,Answer\n"
CMMLU_GOOD = CMMLU_HEADER + "0,一加一等于几？,1,2,3,4,B\n"


def _cmmlu_tree(root: Path, test: str | bytes = CMMLU_GOOD) -> Path:
    for split, text in (("dev", CMMLU_GOOD), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "math.csv").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return root


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg, "DataError messages must be one line"
    return msg


def test_tiny_mmlu_ok_and_na_stays_text(tmp_path):
    data = read_mmlu(_mmlu_tree(tmp_path, "\ufeff" + GOOD + GOOD.replace("1+1", "2+2")))
    assert [q.id for q in data["test"]] == ["mmlu/test/math/0", "mmlu/test/math/1"]
    q = data["test"][0]
    assert q.question == "What is 1+1?"  # BOM stripped
    assert q.choices == ("1", "2", "3", "NA")
    assert q.source == f"{tmp_path}/test/math_test.csv:1"
    assert "val" not in data


def test_mmlu_optional_val_split(tmp_path):
    _mmlu_tree(tmp_path)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "math_val.csv").write_text(GOOD)
    assert [q.id for q in read_mmlu(tmp_path)["val"]] == ["mmlu/val/math/0"]


def test_mmlu_missing_column(tmp_path):
    msg = _error(read_mmlu, _mmlu_tree(tmp_path, GOOD + "Q2?,1,2,3,B\n"))
    assert "math_test.csv:2" in msg and "expected 6 fields" in msg and "found 5" in msg


def test_mmlu_extra_column(tmp_path):
    msg = _error(read_mmlu, _mmlu_tree(tmp_path, GOOD + "Q2?,1,2,3,4,B,x\n"))
    assert "math_test.csv:2" in msg and "found 7" in msg


def test_mmlu_bad_answer_names_file_and_row(tmp_path):
    msg = _error(read_mmlu, _mmlu_tree(tmp_path, GOOD + '"multi\nline?",1,2,3,4,B\nQ3?,1,2,3,4,E\n'))
    # Line 4: the previous row spans lines 2-3.
    assert "math_test.csv:4" in msg and "A, B, C, D" in msg and "'E'" in msg


def test_mmlu_lowercase_answer_rejected(tmp_path):
    assert "'b'" in _error(read_mmlu, _mmlu_tree(tmp_path, "Q?,1,2,3,4,b\n"))


def test_mmlu_answer_whitespace_stripped(tmp_path):
    assert read_mmlu(_mmlu_tree(tmp_path, "Q?,1,2,3,4, C \n"))["test"][0].answer == "C"


def test_mmlu_empty_question(tmp_path):
    msg = _error(read_mmlu, _mmlu_tree(tmp_path, GOOD + '"  ",1,2,3,4,A\n'))
    assert "math_test.csv:2" in msg and "empty question" in msg


def test_mmlu_empty_option(tmp_path):
    msg = _error(read_mmlu, _mmlu_tree(tmp_path, "Q?,1,,3,4,A\n"))
    assert "math_test.csv:1" in msg and "option B" in msg


def test_mmlu_no_dev_dir(tmp_path):
    _mmlu_tree(tmp_path)
    for f in (tmp_path / "dev").iterdir():
        f.unlink()
    (tmp_path / "dev").rmdir()
    msg = _error(read_mmlu, tmp_path)
    assert str(tmp_path / "dev") in msg and "dev" in msg


def test_mmlu_empty_split_dir(tmp_path):
    _mmlu_tree(tmp_path)
    (tmp_path / "test" / "math_test.csv").unlink()
    assert "no .csv files" in _error(read_mmlu, tmp_path)


def test_missing_root(tmp_path):
    assert str(tmp_path / "nope") in _error(read_mmlu, tmp_path / "nope")
    assert str(tmp_path / "nope") in _error(read_cmmlu, tmp_path / "nope")


def test_mmlu_bad_file_name(tmp_path):
    _mmlu_tree(tmp_path)
    (tmp_path / "test" / "math_test.csv").rename(tmp_path / "test" / "math.csv")
    assert "<subject>_test.csv" in _error(read_mmlu, tmp_path)


def test_cmmlu_gbk_copy_reads_same_as_utf8(tmp_path, caplog):
    src = _data("cmmlu") / "dev" / "agronomy.csv"
    text = src.read_text(encoding="utf-8")
    utf8 = read_cmmlu(_cmmlu_tree(tmp_path / "u", text.encode("utf-8")))["test"]
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        gbk = read_cmmlu(_cmmlu_tree(tmp_path / "g", text.encode("gbk")))["test"]
    assert any("GBK" in r.getMessage() for r in caplog.records)

    def strip(qs):
        return [(q.id, q.subject, q.question, q.choices, q.answer, q.source.rsplit(":", 1)[1]) for q in qs]

    assert len(gbk) == 5 and strip(gbk) == strip(utf8)


def test_neither_utf8_nor_gbk(tmp_path):
    # Latin-1 "é" followed by a comma: invalid UTF-8 and invalid GB18030.
    f = tmp_path / "latin1.csv"
    f.write_bytes("Café?,1,2,3,4,A\n".encode("latin-1"))
    with pytest.raises(DataError) as ei:
        read_text(f)
    assert str(ei.value) == (f"{f}: not UTF-8 (byte 0xe9 at offset 3) and not GBK/GB18030 text; re-save it as "
                             "UTF-8, or set dataset.encoding")
    # Valid GB18030 bytes (a 4-byte code for U+0080) but no Chinese text: still rejected.
    g = tmp_path / "junk.csv"
    g.write_bytes(b"Q?,1,2,3,4,A\n\x81\x30\x81\x30\n")
    assert "byte 0x81 at offset 13" in _error(read_text, g)
    # And through a reader.
    msg = _error(read_mmlu, _mmlu_tree(tmp_path / "m", "Café?,1,2,3,4,A\n".encode("latin-1")))
    assert "math_test.csv: not UTF-8" in msg


def test_latin1_that_also_decodes_as_gbk_is_not_read_as_mojibake(tmp_path):
    # "écrit" and "Misérables" in Latin-1 are valid GBK bytes ("閏rit", "Mis閞ables"): refused,
    # naming the way out; with dataset.encoding=latin-1 the text reads as written.
    row = "Qui a écrit Les Misérables?,Hugo,Zola,Camus,Sartre,A\n"
    assert "閏" in row.encode("latin-1").decode("gb18030")
    root = _mmlu_tree(tmp_path / "m", row.encode("latin-1"))
    msg = _error(read_mmlu, root)
    assert "math_test.csv: not UTF-8 (byte 0xe9 at offset 6); it decodes as GBK but looks like Latin-1" in msg
    assert "dataset.encoding=latin-1" in msg
    assert read_mmlu(root, encoding="latin-1")["test"][0].question == "Qui a écrit Les Misérables?"
    # a declared encoding that does not fit is one line too
    assert "not utf-8 (byte 0xe9 at offset 6); check dataset.encoding" in _error(read_mmlu, root, encoding="utf-8")


def test_unreadable_csv_is_one_line(tmp_path):
    """A symlink to itself (or a dangling one) among the CSVs: one line naming it, from the input
    fingerprint (the first thing that reads every file) and from the reader."""
    from omegaconf import OmegaConf

    from finetune.data.prepare import _input_fingerprint

    root = _mmlu_tree(tmp_path / "m")
    loop = root / "test" / "loop_test.csv"
    loop.symlink_to(loop.name)
    assert f"{loop}: cannot be read (Too many levels of symbolic links)" in _error(read_mmlu, root)
    ds = OmegaConf.create({"name": "mmlu", "path": str(root), "general": {"path": None}})
    with pytest.raises(DataError, match="loop_test.csv: cannot be read"):
        _input_fingerprint(ds)


def test_cmmlu_header_missing_answer(tmp_path):
    bad = ",Question,A,B,C,D\n0,一加一等于几？,1,2,3,4\n"
    msg = _error(read_cmmlu, _cmmlu_tree(tmp_path / "a", bad))
    assert "math.csv:1" in msg and "lacks column 'Answer'" in msg
    # Column renamed but rows intact: still reported as the missing column, not a field count.
    bad = CMMLU_GOOD.replace("Answer", "Key")
    msg = _error(read_cmmlu, _cmmlu_tree(tmp_path / "b", bad))
    assert "math.csv:1" in msg and "lacks column 'Answer'" in msg
    # Only the header shorter than the rows.
    bad = ",Question,A,B,C,D\n0,一加一等于几？,1,2,3,4,B\n"
    assert "lacks column 'Answer'" in _error(read_cmmlu, _cmmlu_tree(tmp_path / "c", bad))


def test_cmmlu_row_errors(tmp_path):
    msg = _error(read_cmmlu, _cmmlu_tree(tmp_path / "a", CMMLU_GOOD + "1,问题,1,2,3,4,E\n"))
    assert "math.csv:3" in msg and "'E'" in msg
    msg = _error(read_cmmlu, _cmmlu_tree(tmp_path / "b", CMMLU_GOOD + "1,问题,1,2,3,B\n"))
    assert "math.csv:3" in msg and "expected 7 fields" in msg


def test_cmmlu_no_dev_dir(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "math.csv").write_text(CMMLU_GOOD, encoding="utf-8")
    assert str(tmp_path / "dev") in _error(read_cmmlu, tmp_path)


def test_question_and_option_texts_are_stripped(mmlu, cmmlu, shared):
    """963 MMLU test questions carry stray whitespace in the CSV; the prompts get them stripped."""
    import csv

    raw = 0
    for path in sorted((shared / "data" / "mmlu" / "test").glob("*.csv")):
        with path.open(encoding="utf-8", newline="") as f:
            raw += sum(row[0] != row[0].strip() for row in csv.reader(f))
    assert raw == 963
    for data in (mmlu, cmmlu):
        for q in data["test"] + data["dev"]:
            assert q.question == q.question.strip() and all(c == c.strip() for c in q.choices), q.source


def test_predict_csv_layout_follows_the_dataset_not_the_prompt_style():
    # dataset.style=contest is one prompt style for MMLU and CMMLU alike; a CMMLU CSV (header, index
    # column) must still be read as CMMLU, or the index becomes the question and the answer an option.
    from finetune.data.inputs import read_predict_input
    f = _data("cmmlu") / "test" / "agronomy.csv"
    first = read_cmmlu(_data("cmmlu"))["test"]
    first = next(q for q in first if q.subject == "agronomy")
    recs = read_predict_input(f, "cmmlu", "contest")
    assert recs[0]["prompt"].startswith("Here is a question about")
    assert f"Question: {first.question} \nA.{first.choices[0]}\n" in recs[0]["prompt"]
    assert len(recs) == sum(1 for _ in f.open(encoding="utf-8")) - 1


def test_duplicate_questions_are_kept_out_of_eval(mmlu):
    """MMLU's test split holds 105 repeated questions (same question and options, up to case and
    whitespace). With train_split == eval_split, the hash holdout can put one copy in training and
    another in eval: those are left out of eval, as are repeats within eval."""
    from finetune.data.prepare import _holdout, drop_duplicates

    def q(i, text, choices=("1", "2", "3", "4")):
        return Question(f"x/test/s/{i}", "s", text, choices, "A", f"f.csv:{i}")

    train = [q(0, "What is 2+2?"), q(1, "Capital of France?")]
    evalq = [q(2, "what is  2+2? "), q(3, "Capital of France?", ("a", "b", "c", "d")), q(4, "New?"), q(5, "NEW?")]
    kept, in_train, repeated = drop_duplicates(train, evalq)
    assert [x.id for x in kept] == ["x/test/s/3", "x/test/s/4"] and (in_train, repeated) == (1, 1)
    test = mmlu["test"]
    evalq = [x for x in test if _holdout(x, 0.2)]
    kept, in_train, repeated = drop_duplicates([x for x in test if not _holdout(x, 0.2)], evalq)
    assert (len(evalq), in_train, repeated, len(kept)) == (2876, 31, 6, 2839)
