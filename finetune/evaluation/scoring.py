"""Multiple-choice scoring shared by evaluate and predict: the logits of the answer letters at the
last prompt position, and what follows from them (predicted letter, probabilities)."""
from __future__ import annotations

import re

import numpy as np

from finetune.data import prompts
from finetune.data.records import LETTERS, Question
from finetune.errors import ModelError
from finetune.evaluation import metrics


def letter_token_ids(tok, style: str) -> list[int]:
    """Token ids of the four answer targets (" A".." D" for mmlu, "A".."D" for cmmlu; "A".."D" as
    the assistant's reply in a chat). Each must be a single token, or last-position scoring would
    compare the wrong things."""
    ids = []
    for letter in LETTERS:
        q = Question(id="", subject="", question="", choices=("", "", "", ""), answer=letter, source="")
        t = tok.answer_ids(prompts.target(q, style))[:-1]   # without the EOS
        if len(t) != 1:
            raise ModelError(f"tokenizer {tok.name}: answer {prompts.target(q, style)!r} is {len(t)} tokens, "
                             f"expected 1 for letter scoring (dataset.style={style})")
        ids.append(t[0])
    return ids


def build_eval_prompts(questions: list[Question], dev: list[Question], style: str, num_shots: int, tok,
                       seq_length: int) -> tuple[list[list[int]], dict]:
    """Token ids per question: the k-shot prompt wrapped by the tokenizer ([bos] + prompt, or a chat turn). Shots are the subject's first dev questions;
    when a prompt does not fit, shots are dropped one at a time, and a zero-shot prompt that
    still does not fit keeps its last seq_length tokens (the question end, where scoring happens)."""
    by_subject: dict[str, list[Question]] = {}
    for q in dev:
        by_subject.setdefault(q.subject, []).append(q)
    out, fewer_shots, truncated = [], 0, 0
    for q in questions:
        shots = by_subject.get(q.subject, [])[:num_shots]
        while True:
            content = tok.encode(prompts.build_prompt(q, style, shots))
            ids = tok.wrap(content)
            if len(ids) <= seq_length or not shots:
                break
            shots = shots[:-1]
        if len(shots) < min(num_shots, len(by_subject.get(q.subject, []))):
            fewer_shots += 1
        if len(ids) > seq_length:   # the content loses its start; [bos] or the chat turn stay
            ids = tok.wrap(content[len(ids) - seq_length:])
            truncated += 1
        out.append(ids)
    return out, {"eval_fewer_shots": fewer_shots, "eval_truncated": truncated}


def letter_logits(net, token_lists: list[list[int]], letter_ids: list[int], batch_size: int, seq_length: int,
                  pad_id: int, stats: dict | None = None) -> np.ndarray:
    """[N, 4] logits of the letter tokens at each prompt's last position.

    Prompts are taken in order of length, batch_size at a time (fewer past 512 tokens:
    batches.eval_batches), each batch right-padded to its length bucket (batches.eval_bucket: a
    power of two from 64 up to seq_length; the last batch filled with padding rows), and the head
    runs on the last prompt position only (forward.last_logits_cell).
    With causal attention, padding after a prompt cannot change the logits at its last position,
    so the result is the full model's at that position. `stats`, when given, gets the tokens
    processed and padded and the compiled shapes."""
    import mindspore as ms

    from finetune.data.batches import eval_batches
    from finetune.model.forward import last_logits_cell

    head = last_logits_cell(net)
    head.set_train(False)
    out = np.zeros((len(token_lists), len(letter_ids)), np.float32)
    real = processed = 0
    shapes = set()
    for chunk, rows, length in eval_batches([len(t) for t in token_lists], seq_length, batch_size):
        x = np.full((rows, length), pad_id, np.int32)
        flat = np.arange(rows, dtype=np.int32) * length      # padding rows: position 0
        for row, i in enumerate(chunk):
            x[row, :len(token_lists[i])] = token_lists[i]
            flat[row] += len(token_lists[i]) - 1
        logits = head(ms.Tensor(x), ms.Tensor(flat)).asnumpy()    # [rows, vocab]
        for row, i in enumerate(chunk):
            out[i] = logits[row, letter_ids]
        real += sum(len(token_lists[i]) for i in chunk)
        processed += x.size
        shapes.add(x.shape)
    if stats is not None:
        stats.update(tokens=real, processed=processed, shapes=len(shapes))
    return out


# eval.mc.method=generate: the letter in a generated answer. "The right option is B." (the contest's
# form), else the first A-D standing alone ("B", " B.", "(B) tool"); none = unparsed, counted wrong.
_STATED = re.compile(r"the right option is\s*:?\s*\(?([ABCD])(?![A-Za-z])", re.IGNORECASE)
_ALONE = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


def parse_choice(text: str) -> str | None:
    """The answer letter a generation states, or None."""
    m = _STATED.search(text) or _ALONE.search(text)
    return m.group(1).upper() if m else None


def generated_choices(net, token_lists: list[list[int]], tok, max_new_tokens: int, seq_length: int,
                      batch_size: int) -> tuple[list[str | None], list[str]]:
    """(letter or None per question, the generated text): greedy answers, letters parsed."""
    from finetune.model.generate import greedy_generate

    outs = greedy_generate(net, token_lists, max_new_tokens, tok.eos_id, tok.pad_id, seq_length, batch_size)
    texts = [tok.decode(o) for o in outs]
    return [parse_choice(t) for t in texts], texts


def choose(logits: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(predicted letter per row, [N, 4] probabilities) from letter logits. Non-finite logits are
    broken weights (e.g. diverged training), not a prediction: an error."""
    bad = int((~np.isfinite(logits)).any(axis=1).sum())
    if bad:
        raise ModelError(f"the model's letter logits are not finite (NaN or inf) for {bad} of {len(logits)} "
                         f"questions: its weights are broken (diverged training?), nothing to score")
    return metrics.mc_predictions(logits), metrics.letter_probabilities(logits)


def probabilities_row(probs: np.ndarray) -> dict[str, float]:
    """{'A': p, ...} rounded to 6 digits, as written to eval_predictions.jsonl and predictions.jsonl."""
    return dict(zip(LETTERS, np.round(probs, 6).tolist()))
