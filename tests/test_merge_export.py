"""LoRA merge (W' = W + alpha/rank * B @ A) and Hugging Face export, on real MindSpore + MindFormers,
a real MLflow SQLite store and the real stories260K Llama from ../shared."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from finetune.config.hf_config import read_hf_config
from finetune.data.tokenizer import load_tokenizer
from finetune.errors import ModelError
from finetune.model.adapter import adapter_params, lora_settings, merge_lora, read_adapter, save_adapter
from finetune.model.checkpoint import save_checkpoint
from finetune.model.hf import load_hf_state
from finetune.model.layout import to_hf, to_mindformers
from finetune.model.llama import build_model, load_checkpoint, load_model, load_weights
from finetune.model.lora import apply_lora
from finetune.runtime.context import RunContext
from finetune.stages.export import export, export_weights, hf_config, write_hf_folder
from finetune.stages.merge import merge
from finetune.tracking.store import default_uri
from finetune.tracking.tracker import Tracker
from finetune.training.base import resolve_base
from helpers import resolved, shared_path, spawn


def context(cfg, run_dir, base, tok, tracker=None, given=frozenset()):
    return RunContext(cfg, run_dir, None, base, tok, tracker or Tracker(), 0, given)

A_ = ".mindpet_delta_lora_a"
B_ = ".mindpet_delta_lora_b"


# ------------------------------------------------------------------------------ merge_lora (pure)

def test_merge_lora_hand_computed():
    w = np.array([[1, 2, 3], [4, 5, 6]], np.float32)         # [out 2, in 3]
    a = np.array([[1, 0, -1], [0, 1, 0]], np.float32)        # [rank 2, in 3]
    b = np.array([[2, 1], [0.5, -1]], np.float32)            # [out 2, rank 2]
    other = np.ones(4, np.float16)
    out = merge_lora({"l.weight": w, "norm.weight": other}, {"l" + A_: a, "l" + B_: b}, 3.0)
    # B @ A = [[2, 1, -2], [0.5, -1, -0.5]]; x 3 = [[6, 3, -6], [1.5, -3, -1.5]]
    np.testing.assert_array_equal(out["l.weight"], [[7, 5, -3], [5.5, 2, 4.5]])
    assert out["l.weight"].dtype == np.float32 and set(out) == {"l.weight", "norm.weight"}
    assert out["norm.weight"] is other                                     # untouched tensors are not copied
    np.testing.assert_array_equal(w, [[1, 2, 3], [4, 5, 6]])               # the base is not modified
    half = merge_lora({"l.weight": w.astype(np.float16)}, {"l" + A_: a, "l" + B_: b}, 0.5)
    assert half["l.weight"].dtype == np.float16
    np.testing.assert_array_equal(half["l.weight"], [[2, 2.5, 2], [4.25, 4.5, 5.75]])


def test_merge_lora_refuses_bad_adapters():
    w, a, b = np.zeros((2, 3), np.float32), np.ones((1, 3), np.float32), np.ones((2, 1), np.float32)
    with pytest.raises(ModelError, match="has lora_a but no lora_b"):
        merge_lora({"l.weight": w}, {"l" + A_: a}, 2.0)
    with pytest.raises(ModelError, match="has lora_b but no lora_a"):
        merge_lora({"l.weight": w}, {"l" + B_: b}, 2.0)
    with pytest.raises(ModelError, match=r"does not give the weight's shape \(2, 3\)"):   # A and B swapped / transposed
        merge_lora({"l.weight": w}, {"l" + A_: b.T.copy(), "l" + B_: a.T.copy()}, 2.0)
    with pytest.raises(ModelError, match="unexpected tensor 'l.bias'"):
        merge_lora({"l.weight": w}, {"l" + A_: a, "l" + B_: b, "l.bias": b}, 2.0)
    with pytest.raises(ModelError, match="base model has no x.weight"):
        merge_lora({"l.weight": w}, {"x" + A_: a, "x" + B_: b}, 2.0)


# ------------------------------------------------------------------------------ merge stage, tiny model

def logits_of(net, x):
    import mindspore as ms

    net.set_train(False)
    return net(ms.Tensor(x))[0].asnumpy()


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def tiny(ms_cpu, tmp_path_factory, new_store):
    """A random-init tiny base, a non-trivial adapter (rank 4, alpha 12: scaling 3) saved in the run
    dir together with one step checkpoint, the logits of base + adapter, and the merge stage's result."""
    root = tmp_path_factory.mktemp("merge")
    new_store(root)
    common = [f"output_root={root}", "model.pretrain.epochs=0"]
    cfg = resolved(common + ["lora.rank=4", "lora.alpha=12", "lora.dropout=0.0"])
    tok = load_tokenizer("tiktoken", None)
    run_dir = root / "run"
    x = np.random.default_rng(1).integers(0, tok.vocab_size, (2, cfg.model.seq_length)).astype(np.int32)

    base_ckpt, how = resolve_base(cfg, tok, root, Tracker())   # no corpus: a random-init base, cached
    assert how == "random-init"
    net = load_model(cfg.model, cfg.hardware, tok, 2, base_ckpt)
    base = {p.name: p.asnumpy() for p in net.get_parameters()}
    net = apply_lora(net, cfg.lora, 0)
    rng = np.random.default_rng(0)
    import mindspore as ms
    for _, p in adapter_params(net):    # lora_b starts at zero: give A and B real values
        p.set_data(ms.Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    adapter = {name: p.asnumpy() for name, p in adapter_params(net)}
    tuned_logits = logits_of(net, x)
    save_adapter(net, run_dir / "adapter.ckpt")
    for name, p in adapter_params(net):  # a different adapter for the step checkpoint
        p.set_data(ms.Tensor(adapter[name] * 0.5))
    save_adapter(net, run_dir / "checkpoints" / "adapter-step000002.ckpt")
    (run_dir / "checkpoints" / "adapter-step000004.tmp99.ckpt").write_bytes(b"half")   # a crashed save: skipped

    # merge runs with the *default* lora group (rank 8, alpha 16: 2.0): the scaling must come from the file
    merge_cfg = resolved(common + ["merge.all=true"])
    tracker = Tracker(default_uri(root), "merge-test", "merge", artifact_root=root / "art")
    result = merge(context(merge_cfg, run_dir, base_ckpt, tok, tracker))
    tracker.end("FINISHED")
    return SimpleNamespace(root=root, cfg=merge_cfg, common=common, tok=tok, run_dir=run_dir, x=x, base=base,
                           adapter=adapter, tuned_logits=tuned_logits, result=result, tracker=tracker,
                           base_ckpt=base_ckpt)


FRESH_SCRIPT = """
import sys, numpy as np, finetune, mindspore as ms
from omegaconf import OmegaConf
from finetune.model.llama import build_model, load_checkpoint, setup_context
from finetune.data.tokenizer import load_tokenizer
cfg = OmegaConf.load(sys.argv[1])
setup_context(cfg.hardware, 0)
net = build_model(cfg.model, cfg.hardware, load_tokenizer("tiktoken", None), 2, seed=123)
load_checkpoint(net, sys.argv[2])
net.set_train(False)
np.save(sys.argv[4], net(ms.Tensor(np.load(sys.argv[3])))[0].asnumpy())
"""


def start_fresh_process(cfg, checkpoint, x, folder):
    """Another Python process: build the model, load `checkpoint`, save its logits on x to folder/out.npy."""
    from omegaconf import OmegaConf

    folder.mkdir()
    OmegaConf.save(cfg, folder / "cfg.yaml")
    np.save(folder / "x.npy", x)
    env = {**os.environ, "LOCAL_DEFAULT_PATH": str(folder / "mindformers")}
    return spawn([sys.executable, "-c", FRESH_SCRIPT, str(folder / "cfg.yaml"), str(checkpoint),
                  str(folder / "x.npy"), str(folder / "out.npy")],
                 cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def probe(tiny):
    """logits(weights): one plain model (graph compiled once), loaded with a checkpoint file the way a
    base checkpoint is loaded, or with a dict of tensors, then run on the fixture's input."""
    net = build_model(tiny.cfg.model, tiny.cfg.hardware, tiny.tok, 2, seed=7)

    def logits(weights) -> np.ndarray:
        if isinstance(weights, dict):
            load_weights(net, weights, "test weights")
        else:
            load_checkpoint(net, weights)
        return logits_of(net, tiny.x)
    return logits


def test_merged_logits_match_base_plus_adapter(tiny, probe):
    assert np.abs(probe(tiny.run_dir / "merged.ckpt") - tiny.tuned_logits).max() < 1e-5
    assert np.abs(probe(tiny.base) - tiny.tuned_logits).max() > 1e-2   # the adapter really changes the model


def test_scaling_comes_from_the_adapter_file(tiny, probe):
    import mindspore as ms
    from mlflow.tracking import MlflowClient

    r = tiny.result
    assert {k: r[k] for k in ("merged", "merged_checkpoints", "lora_scaling")} == {
        "merged": str(tiny.run_dir / "merged.ckpt"), "merged_checkpoints": 1, "lora_scaling": 3.0}
    assert r["mlflow_model_uri"] == f"models:/{r['mlflow_model_id']}"   # logged as an MLflow model too
    name = "model.layers.1.attention.wv"
    params = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tiny.run_dir / "merged.ckpt")).items()}
    assert not any("mindpet_delta" in k for k in params)
    delta = tiny.adapter[name + B_].astype(np.float64) @ tiny.adapter[name + A_].astype(np.float64)
    w = tiny.base[name + ".weight"].astype(np.float64)
    np.testing.assert_allclose(params[name + ".weight"], w + 3.0 * delta, rtol=0, atol=1e-7)
    for wrong in (1.0, 2.0):   # MindFormers' tool without --lora_scaling; the lora group the merge ran with
        assert np.abs(params[name + ".weight"] - (w + wrong * delta)).max() > 1e-3
    # and with scaling 1 the logits would be visibly off: the logits test above would catch it
    assert np.abs(probe(merge_lora(tiny.base, tiny.adapter, 1.0)) - tiny.tuned_logits).max() > 1e-3
    tags = MlflowClient(default_uri(tiny.root)).get_run(tiny.tracker.run_id).data.tags
    assert tags["merged"] == str(tiny.run_dir / "merged.ckpt") and tags["lora_scaling"] == "3.0"
    assert tags["merged.step000002"] == str(tiny.run_dir / "checkpoints" / "merged-step000002.ckpt")


def test_merge_all_merges_each_step_checkpoint(tiny):
    import mindspore as ms

    step = ms.load_checkpoint(str(tiny.run_dir / "checkpoints" / "merged-step000002.ckpt"))
    assert not any("mindpet_delta" in k for k in step)
    name = "model.layers.0.attention.wq"
    half = 0.5 * tiny.adapter[name + B_].astype(np.float64) @ (0.5 * tiny.adapter[name + A_].astype(np.float64))
    np.testing.assert_allclose(step[name + ".weight"].asnumpy(), tiny.base[name + ".weight"] + 3.0 * half,
                               rtol=0, atol=1e-7)


@pytest.fixture
def fresh(tiny):
    """Another Python process that loads the merged checkpoint and saves its logits."""
    proc = start_fresh_process(tiny.cfg, tiny.run_dir / "merged.ckpt", tiny.x, tiny.root / "fresh")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.process
def test_merged_checkpoint_in_a_fresh_process(tiny, fresh, probe):
    """Same logits from merged.ckpt loaded by another Python process."""
    _, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err[-3000:]
    out = np.load(tiny.root / "fresh" / "out.npy")
    np.testing.assert_allclose(out, probe(tiny.run_dir / "merged.ckpt"), rtol=0, atol=1e-6)
    assert np.abs(out - tiny.tuned_logits).max() < 1e-5


def test_merging_twice_is_refused(tiny):
    merged = tiny.run_dir / "merged.ckpt"
    cfg = resolved(tiny.common + [f"model.checkpoint={merged}"])
    msg = (f"model.checkpoint {merged} already has a LoRA adapter merged into it "
           f"(from adapter.ckpt, scaling 3); merging again would add it twice")
    with pytest.raises(ModelError) as e:
        merge(context(cfg, tiny.run_dir, merged, tiny.tok))
    assert str(e.value) == msg
    # export, merging base + adapter on the fly, refuses the same way
    on_the_fly = resolved(tiny.common + [f"model.checkpoint={merged}", f"eval.adapter={tiny.run_dir / 'adapter.ckpt'}"])
    with pytest.raises(ModelError, match="already has a LoRA adapter merged"):
        export(context(on_the_fly, tiny.root / "other-run", merged, tiny.tok))


def test_adapter_file_records_its_lora_settings_and_still_loads(tiny, tmp_path):
    import mindspore as ms

    from finetune.model.adapter import tensor_text
    from finetune.model.lora import with_adapter

    raw = ms.load_checkpoint(str(tiny.run_dir / "adapter.ckpt"))
    assert int(raw["lora_rank"].asnumpy()) == 4 and float(raw["lora_alpha"].asnumpy()) == 12.0
    assert tensor_text(raw["lora_target_modules"]) == ".*wq|.*wk|.*wv|.*wo"
    # built from what the file records, whatever the lora group says (default: rank 8, alpha 16)
    cfg = resolved(tiny.common)
    fresh = with_adapter(build_model(cfg.model, cfg.hardware, tiny.tok, 2, seed=3), tiny.run_dir / "adapter.ckpt",
                         cfg.lora, frozenset(), 0)
    for name, p in adapter_params(fresh):
        np.testing.assert_array_equal(p.asnumpy(), tiny.adapter[name])
    assert (fresh.config.pet_config.lora_rank, fresh.config.pet_config.lora_alpha) == (4, 12.0)


def test_lora_settings_come_from_the_file_and_overrides_must_agree():
    meta = {"rank": 4, "alpha": 12.0, "target_modules": ".*wq|.*wv"}
    lora = resolved(["lora.dropout=0.1"]).lora                 # group defaults: rank 8, alpha 16, q/k/v/o
    assert lora_settings(meta, lora) == {"rank": 4, "alpha": 12.0, "target_modules": ".*wq|.*wv", "dropout": 0.1}
    given = frozenset({"lora.alpha", "lora.dropout"})
    with pytest.raises(ModelError, match=r"lora.alpha=16.0 was given, but a.ckpt was trained with lora.alpha=12.0"):
        lora_settings(meta, lora, given, "a.ckpt")
    ok = resolved(["lora.rank=4", "lora.alpha=12", "lora.target_modules=.*wq|.*wv"]).lora
    assert lora_settings(meta, ok, frozenset({"lora.rank", "lora.alpha", "lora.target_modules"}))["rank"] == 4
    with pytest.raises(ModelError, match=r"lora.target_modules=.* was given"):
        lora_settings(meta, lora, frozenset({"lora.target_modules"}))


def test_adapters_without_or_with_wrong_metadata_are_refused(tiny, tmp_path):
    import mindspore as ms

    tensors = [(k, ms.Tensor(v)) for k, v in tiny.adapter.items()]
    save_checkpoint(tensors, tmp_path / "old.ckpt")           # an adapter saved before rank/alpha were stored
    cfg = resolved(tiny.common + [f"eval.adapter={tmp_path / 'old.ckpt'}"])
    with pytest.raises(ModelError, match="does not record the LoRA rank/alpha"):
        merge(context(cfg, tmp_path, tiny.base_ckpt, tiny.tok))
    save_checkpoint(tensors + [("lora_rank", ms.Tensor(np.array(8, np.int32))),
                               ("lora_alpha", ms.Tensor(np.array(16.0)))], tmp_path / "lying.ckpt")
    with pytest.raises(ModelError, match=r"records lora_rank=8, but its lora_a tensors have rank \[4\]"):
        read_adapter(tmp_path / "lying.ckpt")
    with pytest.raises(ModelError, match="adapter checkpoint .*missing.ckpt not found"):
        merge(context(resolved(tiny.common + [f"eval.adapter={tmp_path / 'missing.ckpt'}"]), tmp_path, tiny.base_ckpt,
                      tiny.tok))
    assert not (tmp_path / "merged.ckpt").exists()


# ------------------------------------------------------------------------------ export

def test_to_hf_names():
    cfg = SimpleNamespace(name="t", num_layers=1, tie_word_embeddings=False, qkv_has_bias=True, attn_proj_has_bias=True)
    mf_to_hf = {   # typed out here (layout.py derives one direction from the other) so a wrong inversion fails
        "model.tok_embeddings.embedding_weight": "model.embed_tokens.weight", "model.norm_out.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "model.layers.0.attention.wq.weight": "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.attention.wk.weight": "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.attention.wv.weight": "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.attention.wo.weight": "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.attention.wq.bias": "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.attention.wk.bias": "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.attention.wv.bias": "model.layers.0.self_attn.v_proj.bias",
        "model.layers.0.attention.wo.bias": "model.layers.0.self_attn.o_proj.bias",
        "model.layers.0.feed_forward.w1.weight": "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.feed_forward.w2.weight": "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.feed_forward.w3.weight": "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.attention_norm.weight": "model.layers.0.input_layernorm.weight",
        "model.layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    }
    params = {k: np.full(2, i, np.float32) for i, k in enumerate(mf_to_hf)}
    out = to_hf(params, cfg)
    assert set(out) == set(mf_to_hf.values())
    for mf, hf_name in mf_to_hf.items():
        assert out[hf_name] is params[mf]
    tied = SimpleNamespace(**{**vars(cfg), "tie_word_embeddings": True})
    with pytest.raises(ModelError, match=r"unexpected \['lm_head.weight'\]"):
        to_hf(params, tied)
    no_bias = SimpleNamespace(**{**vars(cfg), "attn_proj_has_bias": False})
    with pytest.raises(ModelError, match=r"unexpected \['model.layers.0.self_attn.o_proj.bias'\]"):
        to_hf(params, no_bias)
    with pytest.raises(ModelError, match=r"missing \['model.layers.0.mlp.down_proj.weight'\]"):
        to_hf({k: v for k, v in params.items() if "w2" not in k}, cfg)
    with pytest.raises(ModelError, match="'model.layers.0.attention.wq.mindpet_delta_lora_a' has no Hugging Face"):
        to_hf({**params, "model.layers.0.attention.wq.mindpet_delta_lora_a": params["lm_head.weight"]}, cfg)


def test_round_trip_stories260k_is_bit_for_bit(ms_cpu, tmp_path):
    """HF -> project (load_base) -> HF: every tensor and the architecture unchanged."""
    from safetensors.numpy import load_file

    from finetune.training.base import convert_hf

    src = shared_path("models", "stories260K-hf")
    cfg = resolved([f"model.checkpoint={src}", "model.seq_length=512", f"output_root={tmp_path}"])
    tok = SimpleNamespace(vocab_size=512, bos_id=1, eos_id=2, pad_id=0)   # ids only: no text tokenizer ships
    params, source, marker = export_weights(context(cfg, tmp_path / "run", convert_hf(src, cfg)[0], tok))
    assert (source, marker) == ("base", None)
    tensors = to_hf(params, cfg.model)
    write_hf_folder(tmp_path / "hf", tensors, hf_config(cfg.model, tensors, tok), {})

    original, exported = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(exported) == sorted(original) and len(original) == 2 + 5 * 9   # tied: no lm_head.weight
    for name, value in original.items():
        assert exported[name].dtype == value.dtype == np.float32, name
        assert np.array_equal(exported[name], value), name
    assert read_hf_config(tmp_path / "hf") == read_hf_config(src)
    a, b = json.loads((src / "config.json").read_text()), json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
                "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert b[key] == a[key], key
    assert b["rope_theta"] == a["rope_parameters"]["rope_theta"]


def test_export_stage_merged_and_on_the_fly(tiny, probe, tmp_path):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    tracker = Tracker(default_uri(tiny.root), "merge-test", "export", artifact_root=tiny.root / "art")
    r = export(context(tiny.cfg, tiny.run_dir, tiny.base_ckpt, tiny.tok, tracker))
    tracker.end("FINISHED")
    out = tiny.run_dir / "hf"
    assert r == {"export_dir": str(out), "export_source": str(tiny.run_dir / "merged.ckpt"), "export_tensors": 2 + 4 * 9}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_config.json"]
    from_merged = load_file(str(out / "model.safetensors"))
    merged = merge_lora(tiny.base, tiny.adapter, 3.0)
    assert sorted(from_merged) == sorted(to_hf(merged, tiny.cfg.model))
    np.testing.assert_array_equal(from_merged["model.layers.2.self_attn.k_proj.weight"],
                                  merged["model.layers.2.attention.wk.weight"])
    np.testing.assert_array_equal(from_merged["model.embed_tokens.weight"],
                                  tiny.base["model.tok_embeddings.embedding_weight"])
    conf = json.loads((out / "config.json").read_text())
    n = tiny.tok.vocab_size   # the built-in encoding's ranks, then bos, eos, pad
    assert (conf["vocab_size"], conf["num_key_value_heads"], conf["max_position_embeddings"]) == (n, 2, 64)
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (n - 3, n - 2, n - 1)
    assert conf["lora_merged"] == "adapter.ckpt, scaling 3"

    # the tokenizer a user loads gives the project's ids and text back
    hf_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "The following are multiple choice questions (with answers) about kind.\n\nAnswer: C ünï 中文"
    assert hf_tok.encode(text).ids == tiny.tok.encode(text)
    assert hf_tok.decode(tiny.tok.encode(text)) == text
    assert [hf_tok.token_to_id(s) for s in ("<|bos|>", "<|eos|>", "<|pad|>")] == [n - 3, n - 2, n - 1]
    assert hf_tok.get_vocab_size() == n

    # no merged.ckpt: base + adapter merged on the fly gives the same tensors, bit for bit
    other = tmp_path / "run"
    (other / "x").mkdir(parents=True)
    shutil.copy(tiny.run_dir / "adapter.ckpt", other / "adapter.ckpt")
    cfg = resolved(tiny.common + [f"export.output={other / 'x'}"])   # an empty folder may be replaced
    r2 = export(context(cfg, other, tiny.base_ckpt, tiny.tok))
    assert r2["export_source"] == f"base + {other / 'adapter.ckpt'}"
    on_the_fly = load_file(str(other / "x" / "model.safetensors"))
    assert sorted(on_the_fly) == sorted(from_merged)
    assert all(np.array_equal(on_the_fly[k], from_merged[k]) for k in from_merged)
    assert not list(other.glob(".x.*"))   # no temp folders left behind
    assert json.loads((other / "x" / "config.json").read_text())["lora_merged"] == "adapter.ckpt, scaling 3"
    # merging into the exported (already merged) model is refused as well
    with pytest.raises(ModelError, match=r"model.checkpoint .*/x already has a LoRA adapter merged into it"):
        merge(context(resolved(tiny.common + [f"model.checkpoint={other / 'x'}"]), other, tiny.base_ckpt, tiny.tok))

    # the export loads back into the project (HF import) and gives base + adapter's logits
    assert np.abs(probe(to_mindformers(load_hf_state(other / "x"), 4, True)) - tiny.tuned_logits).max() < 1e-5

    (other / "notes").mkdir()
    (other / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ModelError, match="is not a Hugging Face model folder; refusing to replace it"):
        export(context(resolved(tiny.common + [f"export.output={other / 'notes'}"]), other, tiny.base_ckpt, tiny.tok))
    assert (other / "notes" / "mine.txt").read_text() == "keep me"



def test_sentencepiece_tokenizer_files():
    """The InternLM tokenizer.model is copied as is; the config makes transformers' LlamaTokenizer(Fast)
    give SentencePiece's ids (checked by hand with AutoTokenizer: a 14 s slow->fast conversion)."""
    from finetune.stages.export import tokenizer_files

    path = shared_path("tokenizers", "internlm_v7_sft.model")
    cfg = resolved(["model=internlm_7b", f"model.tokenizer.path={path}", "model.checkpoint=/x/internlm.ckpt"])
    tok = load_tokenizer("sentencepiece", str(path))
    files = tokenizer_files(cfg.model.tokenizer, tok, 2048)
    assert sorted(files) == ["tokenizer.model", "tokenizer_config.json"]
    assert files["tokenizer.model"] == path.read_bytes()
    conf = json.loads(files["tokenizer_config.json"])
    assert (conf["bos_token"], conf["eos_token"], conf["unk_token"], conf["pad_token"]) == ("<s>", "</s>", "<unk>", "</s>")
    assert conf["legacy"] is False and conf["add_prefix_space"] is False   # InternLM's model adds no dummy "▁"
    assert conf["tokenizer_class"] == "LlamaTokenizer" and conf["model_max_length"] == 2048
