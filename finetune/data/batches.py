"""Batches of prepared rows for the model's cells, made on the host (numpy) so that each compiled
graph has fixed shapes: one compile per (batch, length, labelled positions per row).

Every batch that is not a packed row is cut to a length instead of model.seq_length: padding after
a row's last token cannot change its logits (causal attention), so it need not be computed.
Evaluation, prediction and generation use powers of two (`eval_bucket`: few shapes, known in
advance); unpacked training (train.packing=false) finer buckets (`bucket`: less padding, more
graphs). Rows of similar length are batched together (prepared training data is sorted by length
within chunks, evaluation prompts are taken in order of length), so little padding is left.
"""
from __future__ import annotations

import numpy as np

from finetune.data.packing import labelled_per_row as packed_labelled_per_row
from finetune.data.packing import labelled_positions

# Length buckets: 64, then four steps per power of two (64 80 96 112 128 160 192 224 256 320 ...).
# A row wastes at most a fifth of its bucket on padding (about a tenth on average), and a whole
# range of lengths compiles to few shapes: 21 buckets from 64 to 2048. Below 64 tokens a graph's
# compile time (seconds) outweighs what shorter rows save.
MIN_BUCKET = 64


def bucket(length: int, limit: int) -> int:
    """The smallest bucket length that holds `length` tokens, at most `limit` (model.seq_length)."""
    if length <= MIN_BUCKET:
        return min(limit, MIN_BUCKET)
    step = (1 << ((length - 1).bit_length() - 1)) // 4      # a quarter of the power of two below length
    return min(limit, -(-length // step) * step)


def eval_bucket(length: int, limit: int) -> int:
    """The input length of an evaluation, prediction or generation batch: the smallest power of two
    from MIN_BUCKET up that holds `length` tokens, at most `limit` (model.seq_length). Inference
    graphs are cheap to keep but each costs a compile: at most 6 shapes up to 2048 (64 .. 2048),
    known before any data is read (plan counts them)."""
    return min(limit, max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()))


def eval_rows(batch_size: int, length: int) -> int:
    """Rows of an evaluation batch of prompts cut to `length` (at least 1, at most batch_size)."""
    return max(1, min(batch_size, EVAL_AREA // length ** 2))


def eval_batches(lengths, limit: int, batch_size: int) -> list[tuple[list[int], int, int]]:
    """How scoring runs prompts of these lengths: [(indices, rows, length)], indices taken in order of
    length, each batch right-padded to (rows, length): length = eval_bucket of its longest prompt,
    rows = eval_rows(batch_size, length) (fewer rows for long prompts), so each length is one shape."""
    out, chunk = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if len(chunk) >= eval_rows(batch_size, eval_bucket(lengths[i], limit)):   # i would not fit: close
            length = eval_bucket(lengths[chunk[-1]], limit)
            out.append((chunk, eval_rows(batch_size, length), length))
            chunk = []
        chunk.append(i)
    if chunk:
        length = eval_bucket(lengths[chunk[-1]], limit)
        out.append((chunk, eval_rows(batch_size, length), length))
    return out


def eval_buckets(lengths, limit: int, batch_size: int) -> list[int]:
    """The distinct lengths scoring.letter_logits runs prompts of these lengths at (eval_batches)."""
    return sorted({length for _, _, length in eval_batches(list(lengths), limit, batch_size)})


def row_lengths(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Tokens up to and including each row's last non-pad token (rows are right-padded)."""
    real = ids != pad_id
    return np.where(real.any(axis=1), ids.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)


def answer_positions(ids: np.ndarray, labels: np.ndarray, pad_id: int, k: int) -> tuple[np.ndarray, ...]:
    """Host side of AnswerLoss for one batch of prepared rows ([B, L+1] input ids and labels, the
    model predicts token t+1 at position t): (flat position index [B*k], target id [B*k],
    mask [B*k]) of each row's labelled positions, padded to k per row with masked entries. The
    mask is MindFormers' own: label != IGNORE_ID and input token != pad."""
    tokens = ids[:, :-1]
    flat, target, filled = labelled_positions(labels[:, 1:], k)
    real = np.take_along_axis(tokens, flat - np.arange(len(tokens))[:, None] * tokens.shape[1], axis=1) != pad_id
    return flat.reshape(-1), target.reshape(-1), (filled & real).astype(np.float32).reshape(-1)


def labelled_per_row(labels: np.ndarray) -> int:
    """The most labelled positions in any row of prepared [B, L+1] labels (AnswerLoss's k, fixed
    for a whole run)."""
    return packed_labelled_per_row(labels[:, 1:])


def batch_inputs(ids: np.ndarray, labels: np.ndarray, pad_id: int, answers_per_row: int | None,
                 fit=bucket) -> tuple:
    """The step's inputs for rows of prepared data ([B, seq_length + 1] ids and labels) and the tokens
    the model processes. answers_per_row None: the whole rows, for the model's own loss over every
    position (pretraining on packed text). Otherwise (LoRA on exam questions) the rows are cut to a
    length `fit(longest, seq_length)` (a training bucket, or eval_bucket for a loss measured during
    training) and the loss is taken at the labelled positions only (forward.answer_loss_cell)."""
    if answers_per_row is None:
        return (ids, labels), ids[:, :-1].size
    length = fit(int(row_lengths(ids, pad_id).max()) - 1, ids.shape[1] - 1)   # tokens the model reads
    flat, target, mask = answer_positions(ids[:, :length + 1], labels[:, :length + 1], pad_id, answers_per_row)
    return (ids[:, :length], flat, target, mask), ids.shape[0] * length


# An evaluation batch holds at most this many positions' attention squares: rows x length^2 <= EVAL_AREA
# (16 rows at 256 tokens, 4 at 512, 1 at 1024 and up). A compiled graph keeps its buffers, and on CPU
# those are dominated by the score matrices [rows, heads, L, L] of every layer: measured with the 128M
# model, ~1.5 GB per 1024^2 of area, and a 5-shot MMLU job at seq 2048 passed 22 GB in evaluation when
# each length from 512 up took 4 times this area. Bounded so, every length costs about the same
# and the six lengths up to 2048 stay well inside a 24 GB machine.
EVAL_AREA = 1024 ** 2
