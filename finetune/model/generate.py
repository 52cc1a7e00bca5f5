"""Greedy decoding on CPU (MindFormers' generate() needs Ascend-only kernels, e.g. ArgMaxExt).

Prompts are batched in order of length. Rows are right-padded, so with causal attention a row's
next token depends only on its own tokens, never on its batch neighbours or their padding.

- cached (the default): one forward pass over the prompts (forward.kv_cells' prefill, padded to
  the cache length), then one pass per new token over that token alone, reading the earlier
  positions' keys and values from the cache: the cost of a new token does not grow with the
  prompt (attention reads the cache, the projections, feed-forward and head see one token).
- uncached (cache=False, the reference the cached path is tested against): every new token is a
  forward pass over the whole batch cut to its current length bucket (batches.eval_bucket), head
  on the last position.
"""
from __future__ import annotations

import numpy as np


def greedy_generate(net, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                    seq_length: int, batch_size: int, stats: dict | None = None, cache: bool = True) -> list[list[int]]:
    """New token ids per prompt (EOS not included), at most max_new_tokens or up to seq_length.
    `stats`, when given, gets the tokens processed, the number of compiled shapes and the shapes
    themselves (shape_list: (kind, rows, length), kind = prefill | step | full)."""
    for p in prompts:
        if not 0 < len(p) <= seq_length:
            raise ValueError(f"prompt of {len(p)} tokens does not fit model.seq_length={seq_length}")
    from finetune.data.batches import eval_batches

    decode = _cached_chunk if cache else _uncached_chunk
    results: list[list[int]] = [[] for _ in prompts]
    counts = {"processed": 0, "shapes": set()}
    # In order of length, as many rows as eval_rows allows for the window a batch decodes in (its
    # longest prompt plus max_new_tokens): long prompts decode a few rows at a time.
    need = [min(len(p) + max_new_tokens, seq_length) for p in prompts]
    for chunk, rows, _ in eval_batches(need, seq_length, batch_size):
        new = decode(net, [list(prompts[i]) for i in chunk], max_new_tokens, eos_id, pad_id, seq_length,
                     rows, counts)
        for i, tokens in zip(chunk, new):
            results[i] = tokens
    if stats is not None:
        stats.update(processed=counts["processed"], shapes=len(counts["shapes"]),
                     shape_list=sorted((kind, *shape) for kind, shape in counts["shapes"]))
    return results


def _pick(logits: np.ndarray, seqs: list[list[int]], done: list[bool], new: list[list[int]], eos_id: int,
          seq_length: int) -> None:
    """The greedy choice for every live row: append it, or end the row at EOS / a full window."""
    for row, s in enumerate(seqs):
        if done[row]:
            continue
        token = int(np.argmax(logits[row]))
        if token == eos_id:
            done[row] = True
            continue
        s.append(token)
        new[row].append(token)
        done[row] = len(s) >= seq_length


def _uncached_chunk(net, seqs, max_new_tokens, eos_id, pad_id, seq_length, batch_size, counts):
    import mindspore as ms

    from finetune.data.batches import eval_bucket
    from finetune.model.forward import last_logits_cell

    head = last_logits_cell(net)
    head.set_train(False)
    new: list[list[int]] = [[] for _ in seqs]
    done = [len(s) >= seq_length for s in seqs]
    for _ in range(max_new_tokens):
        if all(done):
            break
        length = eval_bucket(max(len(s) for s, d in zip(seqs, done) if not d), seq_length)
        x = np.full((batch_size, length), pad_id, np.int32)
        flat = np.arange(batch_size, dtype=np.int32) * length
        for row, s in enumerate(seqs):
            if not done[row]:
                x[row, :len(s)] = s
                flat[row] += len(s) - 1
        logits = head(ms.Tensor(x), ms.Tensor(flat)).asnumpy()
        counts["processed"] += x.size
        counts["shapes"].add(("full", x.shape))
        _pick(logits, seqs, done, new, eos_id, seq_length)
    return new


def _cached_chunk(net, seqs, max_new_tokens, eos_id, pad_id, seq_length, batch_size, counts):
    """Prefill the prompts into a cache of length C (a bucket holding the longest prompt and its
    new tokens), then feed each row's newest token at its position until every row is done."""
    import mindspore as ms

    from finetune.data.batches import eval_bucket
    from finetune.model.forward import kv_cells

    prefill, step = kv_cells(net)
    prefill.set_train(False)
    step.set_train(False)
    new: list[list[int]] = [[] for _ in seqs]
    done = [len(s) >= seq_length for s in seqs]
    if all(done) or max_new_tokens <= 0:
        return new
    size = eval_bucket(max(len(s) for s in seqs) + max_new_tokens, seq_length)
    tokens = np.full((batch_size, size), pad_id, np.int32)   # the cache's tokens, for the padding mask
    flat = np.arange(batch_size, dtype=np.int32) * size
    for row, s in enumerate(seqs):
        tokens[row, :len(s)] = s
        flat[row] += len(s) - 1
    logits, keys, values = prefill(ms.Tensor(tokens), ms.Tensor(flat))
    counts["processed"] += tokens.size
    counts["shapes"].add(("prefill", tokens.shape))
    positions = np.arange(size)
    for n in range(max_new_tokens):
        _pick(logits.asnumpy(), seqs, done, new, eos_id, seq_length)
        if all(done) or n == max_new_tokens - 1:
            break
        token = np.full((batch_size, 1), pad_id, np.int32)
        pos = np.zeros(batch_size, np.int32)
        for row, s in enumerate(seqs):
            if not done[row]:            # a finished row's slot is computed but never read
                token[row, 0], pos[row] = s[-1], len(s) - 1
                tokens[row, pos[row]] = s[-1]
        visible = (positions[None, :] <= pos[:, None]) & (tokens != pad_id)
        onehot = (positions[None, :] == pos[:, None]).astype(np.float32)[:, None, :, None]
        # mutable: a tuple given to a graph is otherwise a constant of the compiled graph (one compile per call)
        logits, keys, values = step(ms.Tensor(token), ms.Tensor(pos), ms.Tensor(visible.astype(np.float32)),
                                    ms.Tensor(onehot), ms.mutable(keys), ms.mutable(values))
        counts["processed"] += batch_size
        counts["shapes"].add(("step", (batch_size, size)))
    return new
