"""The embedded demo: made-up words, a text corpus that uses them, and exam questions about them.

Why this shape: LoRA cannot teach a random-init model anything (its frozen head and norms bound
the logits; see the MindSpore notes), so the demo does what fine-tuning does on a real LLM. The
*base* model first learns from plain text (``corpus``): each made-up word (e.g. "blickem") is
used the way a fruit, an animal, a tool or a colour is used ("she ate a juicy blickem."), so the
base learns, distributionally, which kind of thing each word is. The corpus also holds a few
practice questions on another subject (arithmetic), so the base knows the exam format and the
answer letters, but nothing of the demo subjects' questions. LoRA then teaches the exam subjects
on the *train* words; the *test* split asks only about words that occur in no training or dev
question, so answering them needs what the base learned from text.

Each subject asks about the kind of a word with its own fixed option order, e.g. ``kind``:
A. fruit B. animal C. tool D. colour; ``use``: A. ride it B. paint with it ... . Kinds are
balanced, so guessing scores 25%. (Options shuffled per question would need the model to match
option text by position, an induction-style skill a ~1M-parameter model forms too slowly.)
"""
from __future__ import annotations

import random
import re

from finetune.data.records import LETTERS, Question
from finetune.data.squad import squad_prompt

KINDS = ("fruit", "animal", "tool", "colour")

# How a word of each kind is used in running text; {w} is the made-up word.
CONTEXTS: dict[str, tuple[str, ...]] = {
    "fruit": ("she ate a juicy {w}.", "the {w} tasted sweet.", "he peeled the {w} and ate it.",
              "a ripe {w} fell from the tree.", "they made jam from the {w}."),
    "animal": ("the {w} ran across the field.", "a hungry {w} barked at night.", "the {w} slept in its den.",
               "we fed the little {w}.", "the {w} chased its tail."),
    "tool": ("he fixed the chair with a {w}.", "she cut the rope with the {w}.", "the {w} hung in the shed.",
             "use the {w} to tighten the bolt.", "the builder dropped his {w}."),
    "colour": ("the wall was painted {w}.", "she wore a {w} dress.", "the sky turned {w} at dusk.",
               "he mixed the paint until it was {w}.", "the flag was bright {w}."),
}

# The reading set asks what kind of thing a passage's made-up word is: the answer (a kind word)
# is a span of the passage's first sentence, which names its kinds in an order unrelated to the
# sentences', so finding it needs what the word is, which the base learned from the corpus text.
# (Questions whose answer is the made-up word itself need copying a token out of the passage, an
# induction-head skill this ~1M-parameter model did not form in 10 epochs: base F1 1-2.)
QA_QUESTION = "What is the {w}?"
PASSAGE_LEAD = "{kinds}."   # e.g. "a fruit, an animal and a colour." (short: prompts must fit 48 tokens)
# Sentences per passage after the lead: of different kinds, so each question has one answer.
PASSAGE_SENTENCES = 3

# subject -> (question template, option texts indexed like KINDS order given by `order`)
SUBJECTS: dict[str, tuple[str, tuple[str, str, str, str]]] = {
    # option texts in the order they appear (A, B, C, D); each names one kind.
    "kind": ("What kind of thing is a {w}?", ("fruit", "animal", "tool", "colour")),
    "use": ("What would you do with a {w}?", ("ride it", "paint with it", "eat it", "build with it")),
    "place": ("Where would you find a {w}?", ("in a toolbox", "on a palette", "in a fruit bowl", "in a zoo")),
}
# Which kind each option of each subject stands for (same order as the option texts).
_OPTION_KINDS = {
    "kind": ("fruit", "animal", "tool", "colour"),
    "use": ("animal", "colour", "fruit", "tool"),
    "place": ("tool", "colour", "fruit", "animal"),
}

_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kr", "l", "m", "n", "p", "pl",
           "pr", "s", "sk", "sl", "sn", "st", "t", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee", "ai")
_CODAS = ("", "b", "d", "g", "k", "m", "n", "p", "t", "x", "sh", "nk", "rt")

# A fixed pool, so the built-in tokenizer (one token per word) does not depend on dataset.seed.
NAME_POOL_SIZE = 512


def made_up_words(n: int, seed: int) -> list[str]:
    """n distinct two-syllable made-up words, e.g. 'blickem'; deterministic in seed."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CODAS))
    return sorted(names)


def build_world(num_words: int, seed: int) -> dict[str, str]:
    """word -> kind, a quarter of the words of each kind (num_words must be a multiple of 4)."""
    if num_words % 4 or not 4 <= num_words <= NAME_POOL_SIZE:
        raise ValueError(f"dataset.num_words: expected a multiple of 4 in [4, {NAME_POOL_SIZE}] "
                         f"(balanced answers, fixed word pool), got {num_words}")
    rng = random.Random(seed + 1)
    words = sorted(rng.sample(made_up_words(NAME_POOL_SIZE, seed=0), num_words))
    kinds = [KINDS[i % 4] for i in range(num_words)]
    rng.shuffle(kinds)
    return dict(zip(words, kinds))


def practice_questions(n: int, seed: int) -> list[str]:
    """Arithmetic questions in the MMLU format with answers, for the base corpus: they teach the
    format and the letters. The right option's position is random, so they carry no letter bias."""
    rng = random.Random(seed + 4)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        options = [a + b]
        while len(options) < 4:
            o = rng.randint(2, 18)
            if o not in options:
                options.append(o)
        rng.shuffle(options)
        lines = "\n".join(f"{letter}. {o}" for letter, o in zip(LETTERS, options))
        out.append("The following are multiple choice questions (with answers) about arithmetic.\n\n"
                   f"What is {a} plus {b}?\n{lines}\nAnswer: {LETTERS[options.index(a + b)]}")
    return out


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _passage(world: dict[str, str], rng: random.Random) -> tuple[str, list[tuple[str, str, int]]]:
    """A short passage: a lead naming PASSAGE_SENTENCES kinds (in random order), then one sentence
    per kind about a word of that kind (in another random order). Returns the passage and its
    (question, answer kind, answer offset in the passage) triples in sentence order."""
    by_kind: dict[str, list[str]] = {}
    for word, kind in sorted(world.items()):
        by_kind.setdefault(kind, []).append(word)
    kinds = rng.sample(KINDS, PASSAGE_SENTENCES)
    listed = rng.sample(kinds, len(kinds))
    lead = PASSAGE_LEAD.format(kinds=", ".join(map(_article, listed[:-1])) + " and " + _article(listed[-1]))
    sentences, qas = [lead], []
    for kind in kinds:
        word = rng.choice(by_kind[kind])
        sentences.append(rng.choice(CONTEXTS[kind]).format(w=word))
        qas.append((QA_QUESTION.format(w=word), kind, re.search(rf"\b{kind}\b", lead).start()))
    return " ".join(sentences), qas


def reading_texts(world: dict[str, str], n: int, seed: int) -> list[str]:
    """n passages, each followed by all its questions with answers (in random order), for the base
    corpus. The first question is in exactly the prompt format finetune.evaluation.squad uses (its answer
    ends the line, as answer_text expects), so the base learns the reading format; three answers
    per passage give more of that signal per token of corpus."""
    rng = random.Random(seed + 5)
    out = []
    for _ in range(n):
        passage, qas = _passage(world, rng)
        rng.shuffle(qas)
        (q, a, _), rest = qas[0], qas[1:]
        out.append(f"{squad_prompt(passage, q)} {a}" + "".join(f"\nQuestion: {q}\nAnswer: {a}" for q, a, _ in rest))
    return out


def squad_dev(world: dict[str, str], n: int, seed: int, avoid: set[str]) -> dict:
    """A SQuAD v1.1-layout dev set of n questions, 2 per passage, generated from seed. Passages
    that occur in `avoid` (the corpus' own passages) are skipped, so the set is new text."""
    rng = random.Random(seed + 6)
    paragraphs, count, seen = [], 0, set(avoid)
    while count < n:
        passage, qas = _passage(world, rng)
        if passage in seen:
            continue
        seen.add(passage)
        items = []
        for question, answer, start in rng.sample(qas, min(2, n - count)):
            items.append({"id": f"demo-squad-{count}", "question": question,
                          "answers": [{"text": answer, "answer_start": start}]})
            count += 1
        paragraphs.append({"context": passage, "qas": items})
    return {"version": "1.1", "data": [{"title": "demo", "paragraphs": paragraphs}]}


def reading_alpaca(world: dict[str, str], n: int, seed: int, avoid: set[str]) -> list[dict]:
    """n reading examples as Alpaca records (instruction = passage, input = question + cue, output
    = " kind"), one per passage, for mixing into LoRA training (dataset.demo.general_reading).
    Passages in `avoid` (the SQuAD-format dev set's) are skipped, so the dev set stays unseen."""
    rng = random.Random(seed + 7)
    out, seen = [], set(avoid)
    while len(out) < n:
        passage, qas = _passage(world, rng)
        if passage in seen:
            continue
        seen.add(passage)
        question, kind, _ = rng.choice(qas)
        prompt = squad_prompt(passage, question)
        instruction, rest = prompt.split("\n\n", 1)   # from_alpaca_prompt joins them back with "\n\n"
        out.append({"instruction": instruction, "input": rest, "output": f" {kind}", "id": f"demo-reading-{len(out)}"})
    return out


def corpus_passages(docs: list[str]) -> set[str]:
    """The passages of the corpus' reading texts (the part before the question)."""
    return {d.split("\n\nQuestion: ")[0] for d in docs if "\n\nQuestion: " in d}


def corpus(world: dict[str, str], seed: int, num_practice: int, num_reading: int = 0) -> list[str]:
    """Every word in every context of its kind, plus practice questions and reading texts, shuffled."""
    rng = random.Random(seed + 2)
    docs = [c.format(w=word) for word, kind in world.items() for c in CONTEXTS[kind]]
    docs += practice_questions(num_practice, seed)
    docs += reading_texts(world, num_reading, seed)
    rng.shuffle(docs)
    return docs


def questions(world: dict[str, str], seed: int, test_fraction: float, dev_per_subject: int
              ) -> dict[str, list[Question]]:
    """Split words (not questions), so a test word occurs in no train or dev question.

    train: every subject for the training words; dev: the first `dev_per_subject` of them per
    subject (k-shot examples, as MMLU's dev split); test: every subject for the held-out words."""
    rng = random.Random(seed + 3)
    groups: dict[str, list[str]] = {"test": [], "train": []}
    for kind in KINDS:  # stratified, so every split's answers stay balanced
        words = sorted(w for w, k in world.items() if k == kind)
        rng.shuffle(words)
        n_test = round(len(words) * test_fraction)
        groups["test"] += words[:n_test]
        groups["train"] += words[n_test:]
    groups = {k: sorted(v) for k, v in groups.items()}
    out: dict[str, list[Question]] = {"train": [], "dev": [], "test": []}
    for split, group in groups.items():
        for subject, (template, options) in SUBJECTS.items():
            for i, word in enumerate(group):
                answer = LETTERS[_OPTION_KINDS[subject].index(world[word])]
                q = Question(id=f"demo/{split}/{subject}/{i}", subject=subject, question=template.format(w=word),
                             choices=options, answer=answer, source=f"<demo {split}>:{i + 1}")
                out[split].append(q)
                if split == "train" and i < dev_per_subject:
                    out["dev"].append(Question(id=f"demo/dev/{subject}/{i}", subject=subject, question=q.question,
                                               choices=options, answer=answer, source=f"<demo dev>:{i + 1}"))
    return out


def vocabulary_texts() -> list[str]:
    """Texts whose words the built-in tokenizer makes single tokens: every word of the pool and
    every word the corpus, the questions and the prompt headers use."""
    texts = [f"the {w} a {w} {w}" for w in made_up_words(NAME_POOL_SIZE, seed=0)]
    texts += [c.format(w="x") for cs in CONTEXTS.values() for c in cs]
    texts += [template.format(w="x") + " " + subject + " " + " ".join(options)
              for subject, (template, options) in SUBJECTS.items()]
    texts += [f"about arithmetic. What is {a} plus {b}? {a + b}" for a in range(10) for b in range(10)]
    return texts
