"""Packed training rows: many prepared examples per row of exactly model.seq_length positions.

A prepared example is [bos] prompt answer [eos] padded to seq_length + 1 ids, with labels on the
answer and EOS (mindrecord.encode_example). The model reads its first n - 1 tokens and predicts
tokens 1..n, so in a packed row an example takes n - 1 positions: its input tokens, the target
of each position (the next token where labelled, IGNORE_ID elsewhere), its segment number
(1, 2, ... within the row; 0 = padding) and its position ids (0, 1, ... restarting per example).
The attention mask is built from the segments (forward.packed_loss_cell): an example attends to
its own earlier tokens only, so a packed row computes what each example alone would.

Every row has the same shape, so training compiles one graph whatever the data; MMLU rows are
60-400 tokens, so at seq_length 512 a row holds several examples and padding falls to a few
percent (a row of one example padded to seq_length would be mostly padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from finetune.data.records import IGNORE_ID

# First-fit decreasing runs within chunks of this many shuffled examples: a chunk is large enough
# that its lengths fill rows to within a few percent, small enough that a row's examples are a
# random draw of the data (not all the short ones together).
PACK_CHUNK = 1024


@dataclass(frozen=True)
class PackedRows:
    """R packed rows of L positions (int32 arrays [R, L]) and where their examples came from."""
    tokens: np.ndarray      # input token ids; pad_id after the last example
    targets: np.ndarray     # the id each position predicts, IGNORE_ID where there is no loss
    segments: np.ndarray    # 1..k: which example of the row a position belongs to; 0 = padding
    positions: np.ndarray   # position id within its example (0 for padding)
    examples: tuple         # per row, the indices of its examples in the input arrays

    def __len__(self) -> int:
        return len(self.tokens)


def example_lengths(ids: np.ndarray, labels: np.ndarray, pad_id: int) -> np.ndarray:
    """Tokens of each prepared example ([N, S+1] right-padded rows): up to its last labelled or
    non-pad token. The labels count too: when pad_id == eos_id (InternLM), the final EOS looks
    like padding in the ids but carries a label."""
    real = (ids != pad_id) | (labels != IGNORE_ID)
    last = ids.shape[1] - np.argmax(real[:, ::-1], axis=1)
    return np.where(real.any(axis=1), last, 0).astype(np.int64)


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices into sizes) by first-fit decreasing: the largest item first, each
    into the first bin it fits. Every size must be in 1..capacity. Ties keep input order."""
    if len(sizes) and (sizes.min() < 1 or sizes.max() > capacity):
        raise ValueError(f"packing: item sizes must be 1..{capacity}, got {sizes.min()}..{sizes.max()}")
    order = np.argsort(-sizes, kind="stable")
    space = np.empty(len(sizes), np.int64)   # at most one bin per item
    bins: list[list[int]] = []
    for i in order:
        fits = np.flatnonzero(space[:len(bins)] >= sizes[i])
        if len(fits):
            b = int(fits[0])
        else:
            b = len(bins)
            bins.append([])
            space[b] = capacity
        bins[b].append(int(i))
        space[b] -= sizes[i]
    return bins


def pack_order(lengths: np.ndarray, capacity: int, seed: int, chunk: int = PACK_CHUNK) -> list[list[int]]:
    """Which examples share a row: the examples shuffled by `seed`, packed by first-fit decreasing
    within chunks of `chunk`, and the rows shuffled again by `seed` so that a batch of consecutive
    rows mixes long and short examples. `lengths` are positions taken (tokens - 1)."""
    rng = np.random.default_rng([seed, 20])
    order = rng.permutation(len(lengths))
    rows: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        rows += [[int(part[j]) for j in row] for row in first_fit_decreasing(lengths[part], capacity)]
    return [rows[i] for i in rng.permutation(len(rows))]


def pack(ids: np.ndarray, labels: np.ndarray, pad_id: int, seq_length: int, seed: int,
         chunk: int = PACK_CHUNK) -> PackedRows:
    """Pack prepared examples ([N, S+1] ids and labels, S + 1 <= seq_length + 1) into rows of
    seq_length positions. Deterministic from (the examples, seed); every example is used once."""
    n_tokens = example_lengths(ids, labels, pad_id)
    if (n_tokens < 2).any():
        bad = int(np.argmax(n_tokens < 2))
        raise ValueError(f"packing: example {bad} has {int(n_tokens[bad])} token(s); a training example needs "
                         "a prompt token and a target")
    if (n_tokens - 1 > seq_length).any():
        raise ValueError(f"packing: an example of {int(n_tokens.max())} tokens does not fit "
                         f"model.seq_length={seq_length} + 1")
    rows = pack_order(n_tokens - 1, seq_length, seed, chunk)
    shape = (len(rows), seq_length)
    tokens = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, IGNORE_ID, np.int32)
    segments = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, start=1):
            m = int(n_tokens[i]) - 1
            tokens[r, at:at + m] = ids[i, :m]
            targets[r, at:at + m] = labels[i, 1:m + 1]
            segments[r, at:at + m] = s
            positions[r, at:at + m] = np.arange(m)
            at += m
    return PackedRows(tokens, targets, segments, positions, tuple(tuple(m) for m in rows))


def rows_per_step(global_batch: int, examples: int, rows: int, parts: int = 1) -> int:
    """Packed rows per device per micro-batch for a global batch of `global_batch` examples (train
    .batch_size x gradient accumulation x data parallel) split into `parts` (accumulation x data
    parallel): the rows that hold that many examples on average, at least one per part. So a step
    sees about as many examples packed as unpacked, and its tokens follow the data (MMLU at
    seq_length 2048: batch 16 is one row, not 16 rows of 2048 that would hold ~270 questions).
    From the global batch, so the same global batch on more devices gives the same global rows
    whenever they split evenly."""
    total = math.ceil(global_batch * rows / examples - 1e-9) if examples else parts
    return max(1, math.ceil(total / parts))


def micro_batches(rows: int, seq_length: int, max_tokens: int | None) -> tuple[int, int]:
    """(rows per micro-step, micro-steps) that take `rows` packed rows per device within
    `max_tokens` positions per micro-step (hardware.micro_batch_tokens; None: no limit). What a
    compiled step holds grows with rows x seq_length (and rows x seq_length^2 of attention scores
    without flash attention), so a step whose rows would pass the limit runs as more micro-steps of
    fewer rows, gradients accumulated: the same graph and memory whatever the data. E.g. CMMLU with
    cl100k at seq_length 2048 packs ~15 examples a row, so batch 16 needs 2 rows: 2 micro-steps
    of 1 row under 2048 tokens. When rows do not split evenly the micro-steps round up (5 rows
    under a 2-row limit: 3 x 2)."""
    if not max_tokens:
        return rows, 1
    steps = math.ceil(rows / max(1, max_tokens // seq_length))
    return math.ceil(rows / steps), steps


def labelled_per_row(targets: np.ndarray) -> int:
    """The most labelled positions in any packed row: the head's gather size per row, fixed for a
    run so that the step compiles once."""
    return int((targets != IGNORE_ID).sum(axis=1).max()) if len(targets) else 0


def labelled_positions(targets: np.ndarray, k: int, what: str = "row") -> tuple[np.ndarray, ...]:
    """Where the loss is in a batch of rows whose position t predicts targets[:, t] ([B, L]):
    (flat [B, k] indices of the labelled positions in the flattened batch, target [B, k] their
    ids, filled [B, k] True where an entry is real), each row padded to k entries with row r's
    first position (any valid index: unfilled entries carry no loss). The head's gather for the
    packed loss (step_inputs) and the bucketed one (batches.answer_positions)."""
    b, length = targets.shape
    flat = np.repeat(np.arange(b, dtype=np.int32)[:, None] * length, k, axis=1)
    target = np.zeros((b, k), np.int32)
    filled = np.zeros((b, k), bool)
    for r in range(b):
        pos = np.flatnonzero(targets[r] != IGNORE_ID)
        if len(pos) > k:
            raise ValueError(f"{what} {r} has {len(pos)} labelled positions, more than k={k}")
        flat[r, :len(pos)] += pos.astype(np.int32)
        target[r, :len(pos)] = targets[r, pos]
        filled[r, :len(pos)] = True
    return flat, target, filled


def step_inputs(rows: PackedRows, index: np.ndarray, k: int, weight: float) -> tuple[np.ndarray, ...]:
    """The packed loss cell's inputs for the rows `index` (forward.packed_loss_cell):
    (tokens, segments, positions [B, L]; flat [B*k] positions of the labelled tokens in the
    flattened batch; target [B*k]; weight [B*k]). weight is `weight` at a labelled position and 0
    at the padding entries, so the loss sum(weight * cross-entropy) is a mean when weight is one
    over the labelled positions it is averaged over."""
    flat, target, filled = labelled_positions(rows.targets[index], k, "packed row")
    return (rows.tokens[index], rows.segments[index], rows.positions[index], flat.reshape(-1), target.reshape(-1),
            (filled * np.float32(weight)).astype(np.float32).reshape(-1))


def pad_fraction(rows: PackedRows) -> float:
    """Share of the rows' positions that hold no example."""
    return float((rows.segments == 0).mean()) if len(rows) else float("nan")
