"""Greedy decoding on CPU (MindFormers' generate() needs Ascend-only kernels, e.g. ArgMaxExt).

Each new token is one forward pass over the batch cut to its current length bucket
(forward.bucket), with the head on each row's last position only (forward.last_logits_cell).
Rows are right-padded, so with causal attention a row's next token depends only on its own
tokens, never on its batch neighbours or their padding. Prompts are batched in order of length.
"""
from __future__ import annotations

import numpy as np


def greedy_generate(net, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                    seq_length: int, batch_size: int, stats: dict | None = None) -> list[list[int]]:
    """New token ids per prompt (EOS not included), at most max_new_tokens or up to seq_length.
    `stats`, when given, gets the tokens processed and the compiled shapes."""
    import mindspore as ms

    from .forward import bucket, last_logits_cell

    head = last_logits_cell(net)
    head.set_train(False)
    results: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    processed, shapes = 0, set()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [list(prompts[i]) for i in chunk]
        for p in seqs:
            if not 0 < len(p) <= seq_length:
                raise ValueError(f"prompt of {len(p)} tokens does not fit model.seq_length={seq_length}")
        done = [len(s) >= seq_length for s in seqs]
        for _ in range(max_new_tokens):
            if all(done):
                break
            length = bucket(max(len(s) for s, d in zip(seqs, done) if not d), seq_length)
            x = np.full((batch_size, length), pad_id, np.int32)
            flat = np.arange(batch_size, dtype=np.int32) * length
            for row, s in enumerate(seqs):
                if not done[row]:
                    x[row, :len(s)] = s
                    flat[row] += len(s) - 1
            logits = head(ms.Tensor(x), ms.Tensor(flat)).asnumpy()
            processed += x.size
            shapes.add(x.shape)
            for row, s in enumerate(seqs):
                if done[row]:
                    continue
                token = int(np.argmax(logits[row]))
                if token == eos_id:
                    done[row] = True
                    continue
                s.append(token)
                results[chunk[row]].append(token)
                done[row] = len(s) >= seq_length
    if stats is not None:
        stats.update(processed=processed, shapes=len(shapes))
    return results
