"""Hugging Face Llama -> MindFormers: logits match HF transformers, greedy decoding tells the story."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from finetune.config.hf_config import read_hf_config
from finetune.errors import ModelError
from finetune.model.generate import greedy_generate
from finetune.model.llama import load_model
from finetune.training.base import convert_hf
from helpers import resolved

# Max |HF transformers logits - ours| measured on the 10 reference positions: 1.57e-5 (README: "to 1.6e-5")
LOGITS_TOLERANCE = 2e-5


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def stories(shared, ms_cpu, tmp_path_factory):
    path = shared / "models" / "stories260K-hf"
    cfg = resolved([f"model.checkpoint={path}", "model.seq_length=128", f"output_root={tmp_path_factory.mktemp('hf')}"])
    vocab = json.loads((path / "tok512_vocab.json").read_text())
    tok = SimpleNamespace(vocab_size=len(vocab), bos_id=1, eos_id=2, pad_id=0)   # ids only; no text tokenizer ships
    ckpt, how = convert_hf(path, cfg)
    assert how == "converted"
    net = load_model(cfg.model, cfg.hardware, tok, 4, ckpt)
    return SimpleNamespace(path=path, cfg=cfg, net=net, vocab=vocab, tok=tok, ckpt=ckpt)


def decode(ids, vocab):
    out = b""
    for i in ids:
        piece = vocab[i]
        out += bytes([int(piece[3:5], 16)]) if piece.startswith("<0x") else piece.encode()
    return out.decode("utf-8", errors="replace")


def test_config_comes_from_config_json(stories):
    m = stories.cfg.model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.n_kv_heads, m.vocab_size, m.intermediate_size) == \
        (64, 5, 8, 4, 512, 172)
    assert m.tie_word_embeddings and m.rms_norm_eps == 1e-5


def test_logits_match_transformers(stories):
    ids = json.loads((stories.path / "reference_input.json").read_text())["input_ids"]
    ref = np.load(stories.path / "reference_logits.npy")
    x = np.zeros((4, 128), np.int32)
    x[0, :len(ids)] = ids
    import mindspore as ms
    stories.net.set_train(False)
    logits = stories.net(ms.Tensor(x))[0].asnumpy()[0, :len(ids)]
    assert np.abs(logits - ref).max() < LOGITS_TOLERANCE, np.abs(logits - ref).max()


def test_greedy_story_and_batch_independence(stories):
    expected = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    (alone,) = greedy_generate(stories.net, [[1]], 40, 2, 0, 128, 4)
    assert decode(alone, stories.vocab).strip().startswith(expected)
    # the same prompt next to longer, different neighbours gives the same tokens
    batch = greedy_generate(stories.net, [[1, 403, 407, 261], [1], [1, 378, 5]], 40, 2, 0, 128, 4)
    assert batch[1] == alone
    # and the same tokens as the plain method: the whole padded window, every position, every step
    for prompt, got in zip([[1, 403, 407, 261], [1], [1, 378, 5]], batch):
        assert got == full_window_greedy(stories.net, prompt, 40, 2, 0, 128)


def test_cached_decoding_equals_uncached(stories):
    """The key/value cache gives the uncached path's tokens, for prompts of every length in one
    batch (short, long, one that reaches the end of the 128-token window), and its first logits
    equal the last-position logits of the full model."""
    import mindspore as ms

    from finetune.model.forward import kv_cells, last_logits_cell

    rng = np.random.default_rng(0)
    prompts = [[1], [1, 403, 407, 261], [1] + rng.integers(3, 512, 40).tolist(), [1] + rng.integers(3, 512, 100).tolist()]
    stats: dict = {}
    cached = greedy_generate(stories.net, prompts, 40, 2, 0, 128, 4, stats=stats)
    assert cached == greedy_generate(stories.net, prompts, 40, 2, 0, 128, 4, cache=False)
    assert len(cached[3]) == 128 - 101                   # stopped by the window, not by max_new_tokens
    assert stats["shapes"] == 2                          # one batch: a prefill graph and a step graph
    x = np.zeros((4, 64), np.int32)
    x[0, :4], x[1, :1] = [1, 403, 407, 261], [1]
    flat = np.array([3, 64, 128, 192], np.int32)
    first, _, _ = kv_cells(stories.net)[0](ms.Tensor(x), ms.Tensor(flat))
    reference = last_logits_cell(stories.net)(ms.Tensor(x), ms.Tensor(flat))
    np.testing.assert_allclose(first.asnumpy(), reference.asnumpy(), atol=1e-5, rtol=0)


def full_window_greedy(net, prompt, max_new_tokens, eos_id, pad_id, seq_length):
    """The reference: net(x)[0] over [1, seq_length] for every new token (what generate.py did before
    length buckets and last-position logits)."""
    import mindspore as ms

    net.set_train(False)
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        x = np.full((4, seq_length), pad_id, np.int32)   # the compiled batch size
        x[0, :len(seq)] = seq
        token = int(np.argmax(net(ms.Tensor(x))[0].asnumpy()[0, len(seq) - 1]))
        if token == eos_id:
            break
        seq.append(token)
        new.append(token)
    return new


def test_converted_checkpoint_is_cached_and_loads(stories):
    from pathlib import Path

    cached = list((Path(stories.cfg.output_root) / "cache" / "converted").glob("*.ckpt"))
    assert cached == [stories.ckpt]
    again, how = convert_hf(stories.path, stories.cfg)   # now from the cache
    assert (again, how) == (stories.ckpt, "converted (cached)")
    net = load_model(stories.cfg.model, stories.cfg.hardware, stories.tok, 4, again)
    for a, b in zip(net.get_parameters(), stories.net.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_bad_checkpoints_are_named(shared, tmp_path, ms_cpu):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="not Llama-family"):
        read_hf_config(bad)
    # right names, wrong shapes: config says hidden 96
    src = shared / "models" / "stories260K-hf"
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    conf = json.loads((src / "config.json").read_text())
    conf.update(hidden_size=96, head_dim=12)
    (wrong / "config.json").write_text(json.dumps(conf))
    (wrong / "model.safetensors").symlink_to(src / "model.safetensors")
    cfg = resolved([f"model.checkpoint={wrong}", f"output_root={tmp_path}"])
    assert cfg.model.hidden_size == 96   # from config.json, and checked like a command-line value
    ckpt, _ = convert_hf(wrong, cfg)
    with pytest.raises(ModelError, match=r"has shape \(512, 64\).*needs \(512, 96\)"):
        load_model(cfg.model, cfg.hardware, SimpleNamespace(vocab_size=512, bos_id=1, eos_id=2, pad_id=0), 4, ckpt)


def test_hf_config_json_is_checked_at_start_up(shared, tmp_path):
    """An architecture read from config.json goes through the same start-up checks as one given on
    the command line (here: 8 heads do not divide hidden 100)."""
    from finetune.errors import ConfigError

    src = shared / "models" / "stories260K-hf"
    odd = tmp_path / "odd"
    odd.mkdir()
    conf = json.loads((src / "config.json").read_text())
    conf.update(hidden_size=100, head_dim=None, num_key_value_heads=8)
    (odd / "config.json").write_text(json.dumps(conf))
    with pytest.raises((ConfigError, ModelError), match="head_dim|not divisible"):
        resolved([f"model.checkpoint={odd}"])


def test_pytorch_bin_weights_without_torch_say_what_to_do(shared, tmp_path):
    """*.bin checkpoints need torch; this environment has none, and the message says so."""
    import importlib.util

    from finetune.model.hf import load_hf_state

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here: the *.bin path loads instead of refusing")
    src = shared / "models" / "stories260K-hf" / "config.json"
    (tmp_path / "config.json").write_text(src.read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")   # any bytes: never unpickled
    with pytest.raises(ModelError, match=r"PyTorch \*\.bin, which need torch .*convert them to safetensors"):
        load_hf_state(tmp_path)
