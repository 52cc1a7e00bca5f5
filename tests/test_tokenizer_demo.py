from collections import Counter

import pytest

from finetune.data import demo
from finetune.data.prompts import build_prompt, target
from finetune.data.tokenizer import TokenizerError, load_tokenizer
from helpers import shared_path


def test_builtin_encoding_words_are_single_tokens():
    tok = load_tokenizer("tiktoken", None)
    word = demo.made_up_words(demo.NAME_POOL_SIZE, seed=0)[7]
    assert len(tok.encode(" " + word)) == 1
    assert [len(tok.encode(f" {c}")) for c in "ABCD"] == [1, 1, 1, 1]
    text = "What kind of thing is a zzqx? 中文"
    assert tok.decode(tok.encode(text)) == text          # unknown text falls back to bytes
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3 and tok.pad_id == tok.vocab_size - 1


def test_real_tokenizers(shared):
    sp = load_tokenizer("sentencepiece", shared / "tokenizers" / "internlm_v7_sft.model")
    assert (sp.vocab_size, sp.bos_id, sp.eos_id, sp.pad_id) == (103168, 1, 2, 2)   # InternLM-7B's config
    assert sp.decode(sp.encode("The answer is B")) == "The answer is B"
    cl = load_tokenizer("tiktoken", shared / "tokenizers" / "cl100k_base.tiktoken")
    assert cl.encode("hello world") == [15339, 1917]   # cl100k_base ids
    assert cl.vocab_size == 100256 + 3


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("sentencepiece", tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match="model.tokenizer.kind"):
        load_tokenizer("wordpiece", None)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("QQ== 0\nnot-a-rank-line\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2"):
        load_tokenizer("tiktoken", bad)


def test_demo_world_is_balanced_and_test_words_are_held_out():
    world = demo.build_world(160, seed=0)
    assert Counter(world.values()) == {k: 40 for k in demo.KINDS}
    splits = demo.questions(world, seed=0, test_fraction=0.25, dev_per_subject=5)
    word = lambda q: q.question.rstrip("?").split()[-1]  # noqa: E731
    test_words = {word(q) for q in splits["test"]}
    seen = {word(q) for q in splits["train"] + splits["dev"]}
    assert len(test_words) == 40 and not test_words & seen
    assert len(splits["test"]) == 40 * len(demo.SUBJECTS)
    assert Counter(q.answer for q in splits["test"]) == {letter: 30 for letter in "ABCD"}
    # ... but the base corpus mentions every test word, so a base model can know them.
    text = " ".join(demo.corpus(world, seed=0, num_practice=10))
    assert all(f" {w} " in f" {text} " or f" {w}." in text for w in test_words)
    # the answer letter is consistent with the word's kind
    q = splits["test"][0]
    assert demo._OPTION_KINDS[q.subject]["ABCD".index(q.answer)] == world[word(q)]


def test_demo_prompt_fits_tiny_model():
    tok = load_tokenizer("tiktoken", None)
    world = demo.build_world(160, seed=0)
    q = demo.questions(world, 0, 0.25, 5)["train"][0]
    assert len(tok.encode(build_prompt(q, "mmlu") + target(q, "mmlu"))) + 2 <= 65


def test_demo_bad_size():
    with pytest.raises(ValueError, match="num_words"):
        demo.build_world(10, seed=0)


def test_wrong_or_corrupt_tokenizer_files_are_one_line(tmp_path):
    """A SentencePiece model given as tiktoken and the reverse each name the file and the fix; a
    corrupt SentencePiece file names the file (not sentencepiece's 'could not parse ModelProto')."""
    from finetune.data.tokenizer import load_tokenizer
    from finetune.errors import TokenizerError

    spm = shared_path("tokenizers", "internlm_v7_sft.model")
    rank_file = shared_path("tokenizers", "cl100k_base.tiktoken")
    corrupt = tmp_path / "tokenizer.model"
    corrupt.write_bytes(spm.read_bytes()[:1000])
    cases = [("tiktoken", spm, f"{spm} is not a tiktoken rank file (binary byte 0xcc at offset 4405; expected lines "
                               "'base64token rank'); a SentencePiece tokenizer.model? use model.tokenizer.kind=sentencepiece"),
             ("sentencepiece", rank_file, f"{rank_file} is not a SentencePiece model"),
             ("sentencepiece", corrupt, f"{corrupt} is not a SentencePiece model")]
    for kind, path, needle in cases:
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(kind, str(path))
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith("model.tokenizer.path: ")
    with pytest.raises(TokenizerError, match="it is a tiktoken rank file: use model.tokenizer.kind=tiktoken"):
        load_tokenizer("sentencepiece", str(rank_file))
