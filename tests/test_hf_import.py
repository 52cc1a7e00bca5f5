"""Hugging Face Llama -> MindFormers: logits match HF transformers, greedy decoding tells the story."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import compose
from finetune.generate import greedy_generate
from finetune.hf import read_hf_config
from finetune.model import ModelError, build_model, resolve_model_config
from finetune.train import load_base_weights


@pytest.fixture(scope="module")
def stories(shared, ms_cpu, tmp_path_factory):
    path = shared / "models" / "stories260K-hf"
    cfg = compose([f"model.checkpoint={path}", "model.seq_length=128",
                   f"output_root={tmp_path_factory.mktemp('hf')}"])
    resolve_model_config(cfg.model)
    vocab = json.loads((path / "tok512_vocab.json").read_text())
    tok = SimpleNamespace(vocab_size=len(vocab), bos_id=1, eos_id=2, pad_id=0)   # ids only; no text tokenizer ships
    net = build_model(cfg.model, cfg.hardware, tok, 4, seed=0)
    load_base_weights(net, cfg)
    return SimpleNamespace(path=path, cfg=cfg, net=net, vocab=vocab, tok=tok)


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
    assert np.abs(logits - ref).max() < 1e-4


def test_greedy_story_and_batch_independence(stories):
    expected = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    (alone,) = greedy_generate(stories.net, [[1]], 40, 2, 0, 128, 4)
    assert decode(alone, stories.vocab).strip().startswith(expected)
    # the same prompt next to longer, different neighbours gives the same tokens
    batch = greedy_generate(stories.net, [[1, 403, 407, 261], [1], [1, 378, 5]], 40, 2, 0, 128, 4)
    assert batch[1] == alone


def test_converted_checkpoint_is_cached_and_loads(stories):
    cached = list((stories.cfg.output_root and __import__("pathlib").Path(stories.cfg.output_root)
                   / "cache" / "converted").glob("*.ckpt"))
    assert len(cached) == 1
    net = build_model(stories.cfg.model, stories.cfg.hardware, stories.tok, 4, seed=1)
    load_base_weights(net, stories.cfg)   # now from the cache
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
    cfg = compose([f"model.checkpoint={wrong}", f"output_root={tmp_path}"])
    resolve_model_config(cfg.model)
    net = build_model(cfg.model, cfg.hardware, SimpleNamespace(vocab_size=512, bos_id=1, eos_id=2, pad_id=0),
                      4, seed=0)
    with pytest.raises(ModelError, match=r"has shape \(512, 64\).*needs \(512, 96\)"):
        load_base_weights(net, cfg)


def test_pytorch_bin_weights_without_torch_say_what_to_do(shared, tmp_path):
    """*.bin checkpoints need torch; this environment has none, and the message says so."""
    import importlib.util

    from finetune.hf import load_hf_state

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here: the *.bin path loads instead of refusing")
    src = shared / "models" / "stories260K-hf" / "config.json"
    (tmp_path / "config.json").write_text(src.read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")   # any bytes: never unpickled
    with pytest.raises(ModelError, match=r"PyTorch \*\.bin, which need torch .*convert them to safetensors"):
        load_hf_state(tmp_path)
