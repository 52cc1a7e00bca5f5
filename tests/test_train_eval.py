"""Real MindSpore on CPU: LoRA wrapping, the jit training step, and letter-logit evaluation."""
import numpy as np
import pytest

from finetune.data.mindrecord import read_shards
from finetune.data.prepare import prepare
from finetune.data.prepared import load_questions
from finetune.data.tokenizer import load_tokenizer
from finetune.errors import ModelError
from finetune.evaluation.scoring import build_eval_prompts, letter_logits, letter_token_ids
from finetune.model.adapter import load_adapter, save_adapter
from finetune.model.llama import build_model, count_params
from finetune.model.lora import apply_lora
from finetune.training.loop import Schedule, TrainingJob, row_feed, run_steps
from helpers import compose


class _NoTracker:
    def log_metrics(self, *a, **k):
        pass


class _Rows:
    """Collects the step metrics run_steps logs."""
    def __init__(self, rows):
        self.rows = rows

    def log_metrics(self, metrics, step=None):
        self.rows.append(metrics)


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def setup(ms_cpu, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = load_tokenizer("tiktoken", None)
    cfg = compose([f"output_root={root}", "lora.dropout=0.0"])
    prepared = prepare(cfg, tok)
    ids, labels = read_shards(prepared / "mindrecord" / "train.mindrecord")
    return cfg, tok, prepared, ids, labels


def _lora_net(cfg, tok, batch=16, dynamic=True):
    return apply_lora(build_model(cfg.model, cfg.hardware, tok, batch, seed=0, dynamic=dynamic), cfg.lora, 0)


def test_param_counts_tiny(ms_cpu):
    cfg = compose()
    tok = load_tokenizer("tiktoken", None)
    net = _lora_net(cfg, tok)
    c = count_params(net)
    h, kv, r, layers = 128, 2 * (128 // 4), 8, 4   # kv dim = n_kv_heads * head_dim
    per_layer = (h * r + r * h) + 2 * (h * r + r * kv) + (h * r + r * h)   # wq, wk, wv, wo
    assert c["trainable"] == c["adapter"] == layers * per_layer == 28672
    vocab = tok.vocab_size
    ffn = 384
    base = vocab * h + layers * (h * h + 2 * h * kv + h * h + 3 * h * ffn + 2 * h) + h   # tied head
    assert c["base"] == base


def test_target_regex_matching_nothing_is_an_error(ms_cpu):
    cfg = compose(["lora.target_modules=.*query_proj"])
    tok = load_tokenizer("tiktoken", None)
    with pytest.raises(ModelError, match="matches no layer"):
        apply_lora(build_model(cfg.model, cfg.hardware, tok, 16, seed=0), cfg.lora, 0)


def test_lora_training_decreases_loss_and_only_moves_the_adapter(setup, tmp_path):
    cfg, tok, _, ids, labels = setup
    net = _lora_net(cfg, tok)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    opt_cfg = compose(["optimizer.learning_rate=5e-3"]).optimizer
    stats = run_steps(TrainingJob(net, row_feed(ids, labels, tok.pad_id, sparse=False),
                                  Schedule(batch_size=16, epochs=1, seed=0, max_steps=20), opt_cfg, cfg.hardware,
                                  _NoTracker(), metric_prefix="t_", desc="test"))
    assert stats["steps"] == 20
    # A random-init base: the answer loss starts near ln(vocab) ~ 7.9 and LoRA alone pulls it well down.
    assert stats["loss_first"] > 6.0
    assert np.mean(stats["losses"][-5:]) < stats["loss_first"] - 1.0
    after = {p.name: p.asnumpy() for p in net.get_parameters()}
    moved = {n for n in before if not np.array_equal(before[n], after[n])}
    assert moved and all("mindpet_delta_lora" in n for n in moved)
    assert any("lora_b" in n for n in moved)   # B starts at zero; it must have learned

    save_adapter(net, tmp_path / "adapter.ckpt")
    fresh = _lora_net(cfg, tok)
    load_adapter(fresh, tmp_path / "adapter.ckpt")
    for p in fresh.get_parameters():
        if "mindpet_delta_lora" in p.name:
            np.testing.assert_array_equal(p.asnumpy(), after[p.name])


def _six_steps(cfg, tok, ids, labels, batch=16, accumulation=1, sparse=True):
    """6 LoRA steps at lr 5e-3 (a global batch of 16): (losses, gradient norms, run_steps stats)."""
    net = _lora_net(cfg, tok, batch, dynamic=sparse)
    rows, calls = [], []

    def on_step(step, last):   # the during-training hook; True = stop here (at the last step: no change)
        calls.append((step, last))
        return last

    stats = run_steps(TrainingJob(net, row_feed(ids, labels, tok.pad_id, sparse=sparse),
                                  Schedule(batch_size=batch, epochs=1, seed=0, accumulation=accumulation, max_steps=6),
                                  cfg.optimizer, cfg.hardware, _Rows(rows), metric_prefix="t_", desc="test",
                                  on_step=on_step))
    assert calls == [(s, s == 6) for s in range(1, 7)] and stats["steps"] == 6
    return stats["losses"], [r["t_grad_norm"] for r in rows], stats


PLAIN = ["lora.dropout=0.0", "hardware.loss_scale.kind=none", "optimizer.learning_rate=5e-3"]


@pytest.fixture(scope="session")   # one run, two tests compare against it
def plain_steps(setup):
    """What LoRA training runs: the head on labelled positions of length-bucketed rows, batch 16."""
    _, tok, _, ids, labels = setup
    return _six_steps(compose(PLAIN), tok, ids, labels)


def test_accumulation_and_dynamic_loss_scale_match_plain_steps(setup, plain_steps):
    """2 micro-batches of 8 with a dynamic loss scale == 1 batch of 16 without: same examples, same
    per-example token count (letter + EOS), and power-of-two scales are exact in float32. Equal to
    float32 rounding, not bit for bit: the two halves' gradients are summed in another order
    (measured: 5 of 6 losses differ, by at most 4.8e-7, 5.9e-8 relative)."""
    _, tok, _, ids, labels = setup
    c = compose([*PLAIN, "hardware.loss_scale.kind=dynamic"])
    losses, _, _ = _six_steps(c, tok, ids, labels, batch=8, accumulation=2)
    np.testing.assert_allclose(losses, plain_steps[0], rtol=1e-6, atol=0)


def test_loss_on_answer_positions_equals_the_full_model(setup, plain_steps):
    """The head on the labelled positions of length-bucketed rows (what LoRA training runs) gives the
    full model's loss and gradients (MindFormers' LlamaForCausalLM as configured before buckets:
    fixed length, logits at every position): the same loss curve and gradient norms over steps
    with updates."""
    _, tok, _, ids, labels = setup
    full = _six_steps(compose(PLAIN), tok, ids, labels, sparse=False)
    np.testing.assert_allclose(plain_steps[0], full[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(plain_steps[1], full[1], rtol=1e-5, atol=1e-6)
    dense, sparse = full[2], plain_steps[2]
    # model.seq_length=64 is the smallest bucket: one compiled shape either way, the same padding
    assert dense["shapes"] == sparse["shapes"] == 1 and sparse["pad_fraction"] == pytest.approx(dense["pad_fraction"])


def test_last_position_logits_equal_the_full_model(setup):
    """Evaluation's head on the last prompt position of a length-bucketed batch == the full model's
    logits at that position (padded to model.seq_length, every position computed)."""
    import mindspore as ms

    cfg, tok, prepared, _, _ = setup
    questions = load_questions(prepared, "eval")[:10]
    lists, _ = build_eval_prompts(questions, load_questions(prepared, "dev"), "mmlu", 0, tok, cfg.model.seq_length)
    letters = letter_token_ids(tok, "mmlu")
    net = build_model(cfg.model, cfg.hardware, tok, 4, seed=0)
    stats = {}
    fast = letter_logits(net, lists, letters, 4, cfg.model.seq_length, tok.pad_id, stats)
    net = build_model(cfg.model, cfg.hardware, tok, 4, seed=0, dynamic=False)   # the same weights (seed 0)
    net.set_train(False)
    full = np.zeros_like(fast)
    for start in range(0, len(lists), 4):
        x = np.full((4, cfg.model.seq_length), tok.pad_id, np.int32)
        for row, ids in enumerate(lists[start:start + 4]):
            x[row, :len(ids)] = ids
        logits = net(ms.Tensor(x))[0].asnumpy()
        for row, ids in enumerate(lists[start:start + 4]):
            full[start + row] = logits[row, len(ids) - 1, letters]
    np.testing.assert_allclose(fast, full, rtol=0, atol=1e-5)
    assert stats["processed"] == 12 * 64 and stats["shapes"] == 1   # 3 batches of 4 x the 64-token bucket


def test_letter_scoring_ignores_padding_and_batch_neighbours(setup):
    cfg, tok, prepared, _, _ = setup
    questions = load_questions(prepared, "eval")[:6]
    lists, stats = build_eval_prompts(questions, load_questions(prepared, "dev"), "mmlu", 0, tok,
                                      cfg.model.seq_length)
    assert stats == {"eval_fewer_shots": 0, "eval_truncated": 0}
    letters = letter_token_ids(tok, "mmlu")
    net = build_model(cfg.model, cfg.hardware, tok, 4, seed=0)
    batched = letter_logits(net, lists, letters, 4, cfg.model.seq_length, tok.pad_id)
    alone = np.concatenate([letter_logits(net, [x], letters, 4, cfg.model.seq_length, tok.pad_id)
                            for x in lists])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert np.ptp(batched) > 0   # not a degenerate constant


def test_k_shot_prompts_use_same_subject_dev_examples(setup):
    cfg, tok, prepared, _, _ = setup
    q = load_questions(prepared, "eval")[0]
    dev = load_questions(prepared, "dev")
    (zero,), _ = build_eval_prompts([q], dev, "mmlu", 0, tok, 1000)
    (two,), stats = build_eval_prompts([q], dev, "mmlu", 2, tok, 1000)
    shots = [d for d in dev if d.subject == q.subject][:2]
    text = tok.decode(two)
    assert all(s.question in text for s in shots) and len(two) > len(zero)
    # too long for the window: shots are dropped before the question is cut
    (cut,), stats = build_eval_prompts([q], dev, "mmlu", 2, tok, len(zero))
    assert cut == zero and stats["eval_fewer_shots"] == 1


_DROPOUT_SCRIPT = """
import finetune, mindspore as ms, numpy as np
from finetune.model.lora import seeded_dropout_cell
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
d = seeded_dropout_cell(0.25, 0, 1)
d.set_train(True)
x = ms.Tensor(np.ones((8, 64, 32), np.float32))
outs = [d(x).asnumpy() for _ in range(8)]   # graph mode: the cell is compiled
d.set_train(False)
print(repr([float((o == 0).mean()) for o in outs]), float(np.unique(outs[0]).max()), float(d(x).asnumpy().min()))
"""


@pytest.mark.process
def test_lora_dropout_masks_are_the_same_in_every_process(tmp_path):
    """MindSpore's CPU Dropout differs between processes from its 6th call on (same seed); the
    seeded replacement must not: 8 calls, two processes, identical masks; rate and scale right."""
    import sys

    from helpers import run_process

    script = tmp_path / "dropout.py"          # MindSpore compiles graphs from source files, not from -c
    script.write_text(_DROPOUT_SCRIPT)
    runs = [run_process([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    (a, b) = (r.stdout.strip().splitlines()[-1] for r in runs)
    assert a == b
    rates, kept, eval_min = eval(a.split("] ")[0] + "]"), *map(float, a.split("] ")[1].split())
    assert len(set(rates)) > 1 and all(0.23 < r < 0.27 for r in rates)   # a fresh mask each call, p = 0.25
    assert kept == pytest.approx(1 / 0.75) and eval_min == 1.0            # inverted dropout; identity in eval


def test_apply_lora_seeds_every_lora_dropout(ms_cpu):
    from mindspore import nn

    cfg = compose(["lora.dropout=0.1"])
    tok = load_tokenizer("tiktoken", None)
    net = apply_lora(build_model(cfg.model, cfg.hardware, tok, 4, seed=0), cfg.lora, 0)
    dropouts = [c.lora_dropout for _, c in net.cells_and_names() if hasattr(c, "lora_dropout")]
    assert len(dropouts) == 16                                   # 4 layers x wq, wk, wv, wo
    assert not any(isinstance(d, nn.Dropout) for d in dropouts)
    assert len({(d.uniform.seed, d.uniform.seed2) for d in dropouts}) == 16   # a different stream per layer


def test_early_stopping_bookkeeping():
    """train.early_stopping: the best evaluation so far is kept; `patience` evaluations in a row
    without improvement stop the run. Accuracy: higher is better; the general-loss delta: lower."""
    from finetune.training.during import DuringTraining

    def tracker(metric, patience):
        d = DuringTraining.__new__(DuringTraining)
        d.metric, d.patience, d.best, d.best_step, d.since_best = metric, patience, None, None, 0
        return d

    d = tracker("during_mc_accuracy", 2)
    kept = [d.improved(step, {"during_mc_accuracy": acc}) for step, acc in [(2, 0.5), (4, 0.7), (6, 0.7), (8, 0.6)]]
    assert kept == [True, True, False, False] and d.best_step == 4 and d.should_stop
    d = tracker("during_general_loss_delta", 2)
    kept = [d.improved(step, {"during_general_loss_delta": x}) for step, x in [(2, 0.3), (4, 0.1), (6, 0.2)]]
    assert kept == [True, True, False] and d.best == 0.1 and not d.should_stop
    assert not tracker(None, 1).improved(2, {"during_mc_accuracy": 1.0}) and not tracker(None, 1).should_stop


def test_general_text_rows_put_the_loss_on_every_text_token():
    from finetune.data.records import IGNORE_ID
    from finetune.data.tokenizer import load_tokenizer
    from finetune.training.during import text_rows

    tok = load_tokenizer("tiktoken", None)
    ids, labels = text_rows(["the cat sat", "a much longer passage " * 40], tok, 16)
    body = tok.encode("the cat sat") + [tok.eos_id]
    assert ids.shape == labels.shape == (2, 17)
    assert ids[0, :len(body) + 1].tolist() == [tok.bos_id] + body and (ids[0, len(body) + 1:] == tok.pad_id).all()
    assert labels[0, 0] == IGNORE_ID and labels[0, 1:len(body) + 1].tolist() == body
    assert (labels[1, 1:] != IGNORE_ID).all() and labels[1, -1] == tok.eos_id   # cut to the window, EOS kept
