"""Packed training rows: the packing itself (pure), and on a real model that a packed batch computes
exactly what its examples compute one by one (loss, gradients, logits), on real MMLU questions."""
import numpy as np
import pytest

from finetune.data import packing
from finetune.data.mindrecord import encode_example
from finetune.data.mmlu import read_mmlu_file
from finetune.data.prompts import build_prompt, target
from finetune.data.records import IGNORE_ID
from finetune.training.loop import packed_feed
from helpers import compose, shared_path


def test_first_fit_decreasing_fills_bins_in_order():
    sizes = np.array([5, 3, 7, 2, 4, 1, 6])
    bins = packing.first_fit_decreasing(sizes, 10)
    # 7 -> bin0, 6 -> bin1, 5 -> bin2, 4 -> bin1 (6+4), 3 -> bin0 (7+3), 2 -> bin2, 1 -> bin2
    assert bins == [[2, 1], [6, 4], [0, 3, 5]]
    with pytest.raises(ValueError, match="1..10"):
        packing.first_fit_decreasing(np.array([11]), 10)


def _examples(lengths, seq_length, pad=0):
    """Synthetic prepared rows: example i is tokens 1000*i + (1..n), its last two labelled."""
    ids = np.full((len(lengths), seq_length + 1), pad, np.int32)
    labels = np.full_like(ids, IGNORE_ID)
    for i, n in enumerate(lengths):
        ids[i, :n] = 1000 * i + np.arange(1, n + 1)
        labels[i, n - 2:n] = ids[i, n - 2:n]
    return ids, labels


def test_pack_keeps_every_example_once_with_its_own_positions():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=300)
    ids, labels = _examples(lengths, 64)
    rows = packing.pack(ids, labels, 0, 64, seed=3, chunk=100)
    used = sorted(i for members in rows.examples for i in members)
    assert used == list(range(300))
    assert rows.tokens.shape == (len(rows), 64)
    # FFD within chunks of 100 leaves little room: the bound is sum(n - 1) / 64 rows
    assert len(rows) <= int(np.ceil((lengths - 1).sum() / 64)) + 3
    assert packing.pad_fraction(rows) == pytest.approx(1 - (lengths - 1).sum() / rows.tokens.size)
    for r, members in enumerate(rows.examples):
        at = 0
        for s, i in enumerate(members, start=1):
            m = lengths[i] - 1
            np.testing.assert_array_equal(rows.tokens[r, at:at + m], ids[i, :m])
            np.testing.assert_array_equal(rows.targets[r, at:at + m], labels[i, 1:m + 1])   # next-token targets
            assert (rows.segments[r, at:at + m] == s).all()
            np.testing.assert_array_equal(rows.positions[r, at:at + m], np.arange(m))
            at += m
        assert (rows.segments[r, at:] == 0).all() and (rows.targets[r, at:] == IGNORE_ID).all()
    # deterministic from the seed; another seed, other rows
    again = packing.pack(ids, labels, 0, 64, seed=3, chunk=100)
    assert again.examples == rows.examples
    assert packing.pack(ids, labels, 0, 64, seed=4, chunk=100).examples != rows.examples


def test_an_eos_that_equals_pad_still_counts():
    """InternLM: pad_id == eos_id == 2. The final EOS carries a label, so it is part of the example."""
    ids = np.array([[1, 7, 8, 9, 2, 2, 2]], np.int32)
    labels = np.array([[IGNORE_ID, IGNORE_ID, IGNORE_ID, 9, 2, IGNORE_ID, IGNORE_ID]], np.int32)
    assert packing.example_lengths(ids, labels, pad_id=2).tolist() == [5]
    rows = packing.pack(ids, labels, 2, 6, seed=0)
    assert rows.targets[0].tolist() == [IGNORE_ID, IGNORE_ID, 9, 2, IGNORE_ID, IGNORE_ID]


def test_rows_per_step_holds_the_batch_in_examples():
    # 1,000 examples in 250 rows (4 per row): 16 examples -> 4 rows; 10 -> 3 (2.5 rounded up)
    assert packing.rows_per_step(16, 1000, 250) == 4
    assert packing.rows_per_step(10, 1000, 250) == 3
    assert packing.rows_per_step(1, 1000, 250) == 1                  # never zero
    assert packing.rows_per_step(16, 1000, 1000) == 16               # one example per row: as unpacked
    # the global batch split over 2 devices x 2 micro-batches: 64 examples -> 16 rows -> 4 per part
    assert packing.rows_per_step(64, 1000, 250, parts=4) == 4
    assert packing.rows_per_step(16, 1000, 250, parts=2) * 2 == packing.rows_per_step(16, 1000, 250)


@pytest.mark.parametrize("world,accumulation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_step_weights_make_one_mean_over_the_whole_step(world, accumulation):
    """Whatever the device count and accumulation, the labelled positions of one optimizer step
    get weights summing to acc x world (the step averages micro-batches and ranks: a mean of 1)."""
    rng = np.random.default_rng(1)
    ids, labels = _examples(rng.integers(3, 30, size=200), 48)
    for i in range(0, 200, 7):                # some examples carry longer answers
        labels[i, 1:5] = ids[i, 1:5]
    rows = packing.pack(ids, labels, 0, 48, seed=0)
    b = 3
    seen, weight_sum = set(), 0.0
    for rank in range(world):
        feed = packed_feed(rows, rank, world)
        for m in range(accumulation):
            arrays, processed, real = feed.micro(1, m, b, accumulation)
            tokens, segments, positions, flat, tgt, weight = arrays
            assert tokens.shape == (b, 48) and processed == world * b * 48
            weight_sum += weight.sum()
            for r in range(b):   # which rows this rank's micro-batch took
                seen.add(tuple(tokens[r]))
    g = b * accumulation * world
    assert seen == {tuple(t) for t in rows.tokens[g:2 * g]}     # global batch 1 = rows G..2G-1, each once
    assert weight_sum == pytest.approx(accumulation * world, rel=1e-5)


# --- on a real model -----------------------------------------------------------------------------

SEQ = 256
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.n_kv_heads=2",
         "model.intermediate_size=128", f"model.seq_length={SEQ}", "lora.dropout=0.0"]


def test_micro_batches_keep_a_step_within_its_token_limit():
    # CMMLU, cl100k, seq_length 2048: batch 16 needs 2 rows; under 2048 tokens: 2 micro-steps of 1
    assert packing.micro_batches(2, 2048, 2048) == (1, 2)
    assert packing.micro_batches(4, 512, 2048) == (4, 1)           # 4 x 512 fits: unchanged
    assert packing.micro_batches(5, 512, 1024) == (2, 3)           # 5 rows, 2 at a time: 3 x 2
    assert packing.micro_batches(6, 512, 1024) == (2, 3)
    assert packing.micro_batches(3, 4096, 2048) == (1, 3)          # a row longer than the limit: one at a time
    assert packing.micro_batches(7, 2048, None) == (7, 1)          # no limit
    for rows in range(1, 40):
        for limit in (100, 512, 1000, 2048, 5000):
            per, steps = packing.micro_batches(rows, 512, limit)
            assert per * steps >= rows and per * (steps - 1) < rows  # every row, no empty micro-step
            assert per * 512 <= max(limit, 512)


@pytest.fixture(scope="module")
def mmlu_model(ms_cpu):
    """A random-init 2-layer Llama with cl100k's vocabulary, LoRA on q/k/v/o with random (non-zero)
    B so that every LoRA weight gets a gradient, and real MMLU test questions as prepared rows."""
    import mindspore as ms

    from finetune.data.tokenizer import load_tokenizer
    from finetune.model.llama import build_model
    from finetune.model.lora import apply_lora

    tok = load_tokenizer("tiktoken", str(shared_path("tokenizers", "cl100k_base.tiktoken")))
    questions = read_mmlu_file(shared_path("data", "mmlu", "test", "astronomy_test.csv"), "test", "astronomy")
    encoded = [encode_example(build_prompt(q, "mmlu"), target(q, "mmlu"), tok, SEQ) for q in questions[:60]]
    encoded = [e for e in encoded if e is not None]
    ids = np.array([e[0] for e in encoded], np.int32)
    labels = np.array([e[1] for e in encoded], np.int32)
    cfg = compose(SMALL + ["model.tokenizer.path=" + str(shared_path("tokenizers", "cl100k_base.tiktoken"))])
    net = apply_lora(build_model(cfg.model, cfg.hardware, tok, 1, seed=0), cfg.lora, 0)
    rng = np.random.default_rng(0)
    for p in net.get_parameters():
        if "lora_b" in p.name:
            p.set_data(ms.Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    rows = packing.pack(ids, labels, tok.pad_id, SEQ, seed=0)
    return net, tok, ids, labels, rows


def test_mmlu_rows_pack_tightly(mmlu_model):
    _, tok, ids, labels, rows = mmlu_model
    lengths = packing.example_lengths(ids, labels, tok.pad_id)
    assert 60 < lengths.mean() < 200 and len(rows) < len(ids) / 2     # several questions per row


def test_packed_batch_loss_and_gradients_equal_the_examples_one_by_one(mmlu_model):
    """sum over the packed batch == the model's own loss (MindFormers' LlamaForCausalLM, logits at
    every position) of each example alone, weighted by its labelled tokens; gradients likewise."""
    import mindspore as ms

    from finetune.model.forward import causal_lm, packed_loss_cell

    net, tok, ids, labels, rows = mmlu_model
    net.set_train(True)
    params = [p for p in net.get_parameters() if p.requires_grad]
    index = np.arange(3)
    members = [i for r in index for i in rows.examples[r]]
    labelled = int((rows.targets[index] != IGNORE_ID).sum())
    assert len(members) >= 5
    arrays = packing.step_inputs(rows, index, packing.labelled_per_row(rows.targets), 1.0 / labelled)
    loss, grads = ms.value_and_grad(packed_loss_cell(net), None, params)(*(ms.Tensor(a) for a in arrays))

    full = ms.value_and_grad(causal_lm(net), None, params)
    ref_loss, ref_grads = 0.0, [np.zeros(p.shape, np.float32) for p in params]
    for i in members:
        n = int((labels[i, 1:] != IGNORE_ID).sum())
        one, g = full(ms.Tensor(ids[i:i + 1]), ms.Tensor(labels[i:i + 1]))   # padded to SEQ + 1, masked
        ref_loss += float(one.asnumpy().item()) * n / labelled
        for acc, gi in zip(ref_grads, g):
            acc += gi.asnumpy() * n / labelled
    assert float(loss.asnumpy()) == pytest.approx(ref_loss, abs=1e-5)
    assert sum(float(np.abs(g).max()) > 0 for g in ref_grads) == len(params)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g.asnumpy(), ref, rtol=0, atol=1e-5)


def test_an_example_never_sees_another(mmlu_model):
    """Every position of a packed example has the logits of the example run alone (its positions
    restart at 0), and changing one example's tokens moves none of its row-mates' logits."""
    import mindspore as ms

    from finetune.model.forward import causal_lm, packed_logits_cell

    net, tok, ids, labels, rows = mmlu_model
    net.set_train(False)
    r = int(np.argmax([len(m) for m in rows.examples]))
    assert len(rows.examples[r]) >= 3
    cell = packed_logits_cell(net)
    flat = np.arange(SEQ, dtype=np.int32)
    inputs = [rows.tokens[r:r + 1], rows.segments[r:r + 1], rows.positions[r:r + 1]]
    logits = cell(*(ms.Tensor(a) for a in inputs), ms.Tensor(flat)).asnumpy()

    model = causal_lm(net)
    for s, i in enumerate(rows.examples[r], start=1):
        at = np.flatnonzero(rows.segments[r] == s)
        alone = model(ms.Tensor(ids[i:i + 1, :SEQ]))[0].asnumpy()[0]      # eval mode: [SEQ, V]
        np.testing.assert_allclose(logits[at], alone[:len(at)], rtol=0, atol=1e-5)

    changed = rows.tokens[r:r + 1].copy()
    first = rows.segments[r] == 1
    changed[0, first] = np.random.default_rng(2).integers(0, tok.vocab_size, first.sum())
    moved = cell(ms.Tensor(changed), *(ms.Tensor(a) for a in inputs[1:]), ms.Tensor(flat)).asnumpy()
    others = rows.segments[r] > 1
    assert np.abs(moved[first] - logits[first]).max() > 1e-3          # the changed example did move
    np.testing.assert_array_equal(moved[others], logits[others])      # the others: bit for bit


def _packed_run(net_rows, batch, accumulation, steps=5):
    from finetune.training.loop import Schedule, TrainingJob, run_steps

    net, tok, ids, labels, rows = net_rows
    cfg = compose(SMALL + ["hardware.loss_scale.kind=none", "optimizer.learning_rate=5e-3"])
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters() if p.requires_grad}
    try:
        schedule = Schedule(batch_size=batch, epochs=1, seed=0, accumulation=accumulation, max_steps=steps)
        return run_steps(TrainingJob(net, packed_feed(rows), schedule, cfg.optimizer, cfg.hardware, _Quiet(),
                                     metric_prefix="t_", desc="test"))
    finally:   # the module's model is shared: put the weights back
        import mindspore as ms

        for p in net.get_parameters():
            if p.name in before:
                p.set_data(ms.Tensor(before[p.name]))


class _Quiet:
    def log_metrics(self, *a, **k):
        pass


def test_packed_training_compiles_once_and_accumulation_is_the_same_step(mmlu_model):
    """Real MMLU questions of every length: one step graph for the whole run; 2 micro-batches of 1
    packed row == 1 batch of 2 rows (the step's mean over its labelled tokens, however they fall)."""
    one = _packed_run(mmlu_model, batch=2, accumulation=1)
    assert one["shapes"] == 1 and one["steps"] == 5
    assert one["pad_fraction"] < 0.15
    assert one["losses"][-1] < one["losses"][0]
    two = _packed_run(mmlu_model, batch=1, accumulation=2)
    assert two["shapes"] == 2                       # the micro-step (activations) and the small update graph
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=2e-5)


def _resident_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    raise AssertionError("no VmRSS")


def test_released_graphs_give_their_memory_back(mmlu_model):
    """MindSpore keeps a compiled graph's buffers after its step and model are gone; release_graphs
    (called by app.run between stages) returns them, and training again works (it recompiles)."""
    import gc

    from finetune.model.llama import release_graphs

    run = _packed_run(mmlu_model, batch=4, accumulation=1, steps=2)
    gc.collect()
    before = _resident_gb()
    release_graphs()
    after = _resident_gb()
    assert before - after > 0.3, (before, after)
    again = _packed_run(mmlu_model, batch=4, accumulation=1, steps=2)
    np.testing.assert_allclose(again["losses"], run["losses"], rtol=0, atol=1e-6)


def test_long_evaluation_batches_take_fewer_rows():
    """Prompts in order of length, batch 16; past 256 tokens fewer rows (512: 4, 1024 and 2048: 1:
    rows x length^2 <= 1024^2), each length one shape, every prompt once."""
    from finetune.data.batches import eval_batches

    lengths = [50] * 20 + [300] * 5 + [900] * 6 + [1500] * 2
    batches = eval_batches(lengths, 2048, 16)
    shapes = [(rows, length) for _, rows, length in batches]
    assert shapes == [(16, 64), (16, 64), (4, 512), (4, 512)] + [(1, 1024)] * 6 + [(1, 2048)] * 2
    assert [len(c) for c, _, _ in batches] == [16, 4, 4, 1] + [1] * 8
    assert sorted(i for c, _, _ in batches for i in c) == list(range(len(lengths)))


def test_long_decoding_batches_take_fewer_rows(ms_cpu):
    """Greedy decoding batches by the window it decodes in (prompt + new tokens) under the same
    rows x length^2 bound as scoring: 900-token prompts decode one row at a time in a 1024 cache
    even at batch 8, short ones 8 rows at a time at 64; every prompt gets its answer."""
    from finetune.data.tokenizer import load_tokenizer
    from finetune.model.generate import greedy_generate
    from finetune.model.llama import build_model

    tok = load_tokenizer("tiktoken", None)
    cfg = compose(["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.n_kv_heads=1",
                   "model.intermediate_size=64", "model.seq_length=2048"])
    net = build_model(cfg.model, cfg.hardware, tok, 8, seed=0)
    rng = np.random.default_rng(0)
    prompts = [[tok.bos_id] + rng.integers(10, 200, n).tolist() for n in (899, 40, 899, 30, 899)]
    stats: dict = {}
    out = greedy_generate(net, prompts, 4, -1, tok.pad_id, 2048, 8, stats=stats)
    assert [len(o) for o in out] == [4] * 5                          # eos_id -1: no row stops early
    assert stats["shape_list"] == [("prefill", 1, 1024), ("prefill", 8, 64), ("step", 1, 1024), ("step", 8, 64)]
    assert stats["processed"] == 3 * (1024 + 3) + (8 * 64 + 3 * 8)    # 3 one-row batches, one of 8 rows
