"""The `plan` stage (dry run) and the Ascend 910B / data-parallel presets.

Counts are checked against hand arithmetic for InternLM-7B and against really built MindFormers
models (tiny, on CPU) with mindformers.pet LoRA applied; the Ascend profile against the
MindSpore context arguments and the MindFormers LlamaConfig it produces."""
import json
import os
import sqlite3
import sys
from collections import Counter

import pytest

from finetune.errors import ConfigError
from finetune.runtime.context import RunContext
from finetune.stages.plan import (
    GB,
    lora_layers,
    lora_param_count,
    memory_estimate,
    module_param_counts,
    plan,
    resolve_vocab,
    run_command,
)
from finetune.tracking.tracker import Tracker
from helpers import REPO, compose, resolved, run_process, shared_path

INTERNLM_TOK = ("tokenizers", "internlm_v7_sft.model")


def internlm(extra=()):
    tok = shared_path(*INTERNLM_TOK)
    return resolved(["model=internlm_7b", "hardware=ascend910b", "parallel=dp4",
                     "model.checkpoint=/nonexistent/internlm.ckpt", f"model.tokenizer.path={tok}", *extra])


def plan_in(cfg, run_dir):
    """The plan stage as app.run calls it for stages=[plan]: no tokenizer, data or base weights."""

    return plan(RunContext(cfg, run_dir, None, None, None, Tracker()))


# InternLM-7B by hand: vocab 103168, hidden 4096, 32 layers, FFN 11008, biases on q/k/v/o, untied head.
EMBED = 103168 * 4096                      # 422,576,128 (and the same again for lm_head)
ATTN = 4 * (4096 * 4096 + 4096)           # wq wk wv wo with biases: 67,125,248 per layer
FFN = 3 * 4096 * 11008                    # w1 w2 w3: 135,266,304 per layer
NORMS = 2 * 4096                          # attention_norm + ffn_norm per layer
BASE = 2 * EMBED + 32 * (ATTN + FFN + NORMS) + 4096
LORA = 32 * 4 * 8 * (4096 + 4096)         # rank 8 on 4 square projections per layer


def test_internlm_7b_counts_match_the_seed(tmp_path):
    assert BASE == 7_321_948_160 and LORA == 8_388_608   # the arithmetic above is the seed's figure
    cfg = internlm(["train.batch_size=2"])
    r = plan_in(cfg, tmp_path)
    assert r["plan_total_params"] == 7_321_948_160
    assert r["plan_trainable_params"] == 8_388_608
    assert round(r["plan_trainable_ratio_pct"], 4) == 0.1146
    assert r["plan_world_size"] == 4
    assert r["plan_tokens_per_step"] == 2 * 4 * 1 * 2048
    assert r["missing_files"] == ["model.checkpoint=/nonexistent/internlm.ckpt"]   # tokenizer exists, demo has no path
    report = json.loads((tmp_path / "plan.json").read_text())
    counts = report["params_per_module"]
    assert counts["model.layers.31.attention.wk"] == 4096 * 4096 + 4096
    assert counts["model.layers.0.feed_forward.w2"] == 11008 * 4096
    assert counts["lm_head"] == counts["model.tok_embeddings"] == EMBED
    assert report["param_groups"] == {"embedding": EMBED, "attention": 32 * ATTN, "feed_forward": 32 * FFN,
                                      "norms": 32 * NORMS + 4096, "lm_head": EMBED}
    assert len(report["lora_layers"]) == 128 and "model.layers.5.attention.wo" in report["lora_layers"]


def _real_counts(overrides, tmp_path):
    """count_params and per-cell counts of the really built model (as train.py builds it) + LoRA."""
    from finetune.data.tokenizer import load_tokenizer
    from finetune.model.llama import build_model, count_params
    from finetune.model.lora import apply_lora

    cfg = compose(overrides)
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    net = apply_lora(build_model(cfg.model, cfg.hardware, tok, 2, 0), cfg.lora, 0)
    per_cell, seen = Counter(), set()
    for p in net.get_parameters():
        if "mindpet_delta" in p.name or id(p) in seen:
            continue
        seen.add(id(p))
        per_cell[p.name.rsplit(".", 1)[0]] += p.size
    return cfg, count_params(net), dict(per_cell)


@pytest.mark.parametrize("overrides", [
    [],                                                         # tiny: GQA (2 kv heads of 4), tied, attention LoRA
    ["lora.target_modules=.*wq|.*w1", "model.n_kv_heads=1", "model.qkv_has_bias=true",
     "model.attn_proj_has_bias=true", "model.tie_word_embeddings=false", "lora.rank=4"],
    # pet matches each cell's own name: 'feed_forward' matches but is no Linear, so the FFN is
    # skipped and only wq is adapted (matching dotted names would pick w1/w2/w3 instead).
    ["lora.target_modules=wq|.*feed_forward.*", "model.n_kv_heads=null"],
], ids=["default", "wq-w1-gqa1-bias-untied", "pet-own-name-semantics"])
def test_counts_equal_the_real_tiny_model(ms_cpu, overrides, tmp_path):
    cfg, real, per_cell = _real_counts(overrides, tmp_path)
    vocab, _ = resolve_vocab(cfg.model)
    counts = module_param_counts(cfg.model, vocab)
    lora = lora_param_count(cfg.model, cfg.lora)
    assert counts == per_cell
    assert sum(counts.values()) == real["base"]
    assert lora == real["adapter"] == real["trainable"] > 0


def test_lora_layers_follow_pet_walk():
    cfg = compose()
    assert sorted(lora_layers(cfg.model, "wq|.*feed_forward.*")) == [f"model.layers.{i}.attention.wq" for i in range(4)]
    with pytest.raises(ConfigError, match=r"lora.target_modules='\.\*attention' matches no layer"):
        lora_param_count(cfg.model, compose(["lora.target_modules=.*attention"]).lora)
    with pytest.raises(ConfigError, match="lora.target_modules"):
        lora_param_count(cfg.model, compose(["lora.target_modules=.*lm_head"]).lora)   # outside pet's walk


@pytest.mark.slow   # MindFormers' LlamaConfig: imports MindFormers (~12 s)
def test_ascend910b_context_and_llama_config(shared):
    import mindspore as ms

    from finetune.data.tokenizer import load_tokenizer
    from finetune.model.llama import context_kwargs, llama_config

    cfg = internlm()
    assert context_kwargs(cfg.hardware) == {"mode": ms.GRAPH_MODE, "device_target": "Ascend",
                                            "max_device_memory": "58GB"}
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    c = llama_config(cfg.model, cfg.hardware, 103168, tok, 2)
    # LlamaConfig converts dtype strings to mindspore types (convert_mstype)
    assert (c.compute_dtype, c.param_init_type, c.embedding_init_type) == (ms.float16,) * 3
    assert (c.layernorm_compute_type, c.softmax_compute_type, c.rotary_dtype) == (ms.float32,) * 3
    assert (c.fused_rms_norm, c.use_rope_slice, c.use_flash_attention, c.use_past) == (True, False, True, False)
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.n_kv_heads, c.intermediate_size) == \
        (103168, 4096, 32, 32, None, 11008)
    assert (c.qkv_has_bias, c.attn_proj_has_bias, c.tie_word_embeddings) == (True, True, False)
    assert (c.seq_length, c.rms_norm_eps, c.theta) == (2048, 1e-6, 10000.0)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    hw = cfg.hardware
    assert (hw.loss_scale.kind, hw.loss_scale.init_scale, hw.loss_scale.factor, hw.loss_scale.window) == \
        ("dynamic", 65536.0, 2.0, 1000)


@pytest.mark.slow   # MindFormers' LlamaConfig: imports MindFormers (~12 s)
def test_ascend910b_recompute_reaches_mindformers(shared):
    """MindFormers' Llama reads recompute from config.parallel_config.recompute (LayerSetting),
    not from a `recompute_config` attribute."""
    from finetune.data.tokenizer import load_tokenizer
    from finetune.model.llama import llama_config

    cfg = internlm()
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    c = llama_config(cfg.model, cfg.hardware, 103168, tok, 2)
    assert c.parallel_config.recompute.recompute is True, \
        "model.llama_config must pass parallel_config={'recompute': {'recompute': hw.recompute}}"


def test_memory_refuses_what_does_not_fit_and_accepts_the_seed_setup(tmp_path):
    cfg = internlm(["hardware.param_init_type=float32", "train.batch_size=64", "hardware.recompute=false"])
    # by hand, bytes per device: fp32 weights + fp32 LoRA (params, grads, 2 moments)
    # + 32 layers x 34 s b h (16-bit, flash attention) + fp32 logits b x 2 (answer + EOS) x V
    need = BASE * 4 + LORA * 4 * 4 + 32 * 34 * 2048 * 64 * 4096 + 64 * 2 * 103168 * 4
    short = (need - 58 * GB) / GB
    with pytest.raises(ConfigError, match=rf"needs {need / GB:.2f} GB per device .*"
                                          rf"hardware.max_device_memory=58GB is short by {short:.2f} GB"):
        plan_in(cfg, tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["fits"] is False   # written before refusing

    cfg = internlm(["train.batch_size=2"])
    r = plan_in(cfg, tmp_path)
    mem = json.loads((tmp_path / "plan.json").read_text())["memory_bytes"]
    # 7,321,948,160 x 2 bytes = 14.64e9 at fp16, plus the RMSNorm weights, which MindFormers keeps in
    # float32 (layernorm_compute_type): 65 x 4096 x 2 more bytes
    assert mem["base_weights"] == 7_321_948_160 * 2 + 65 * 4096 * 2 == 14_644_428_800
    assert mem["logits"] == 2 * 2 * 103168 * 4    # batch 2 x the two labelled positions (was x 2048 positions)
    assert mem["activations_recompute"] == 32 * 2 * 2048 * 2 * 4096 + 34 * 2048 * 2 * 4096
    assert mem["optimizer_state"] == 2 * LORA * 4
    total = mem["base_weights"] + 4 * LORA * 4 + mem["logits"] + mem["activations_recompute"]
    assert r["plan_memory_gb"] == r["plan_memory_gb_recompute"] == pytest.approx(total / GB)   # 15.30
    no_recompute = total - mem["activations_recompute"] + 32 * 34 * 2048 * 2 * 4096   # flash attention: no s^2 term
    assert mem["activations_no_recompute"] == 32 * 34 * 2048 * 2 * 4096
    assert r["plan_memory_gb_no_recompute"] == pytest.approx(no_recompute / GB)
    assert (round(r["plan_memory_gb_no_recompute"], 2), round(r["plan_memory_gb"], 2)) == (30.77, 15.30)   # README


def test_weight_bytes_equal_a_real_model_built_with_ascend_dtypes(ms_cpu):
    """Construction only (nothing runs): every parameter dtype as MindFormers creates it for
    hardware=ascend910b, with biases on."""
    from finetune.data.tokenizer import load_tokenizer
    from finetune.model.llama import build_model

    cfg = compose(["hardware=ascend910b", "model.qkv_has_bias=true", "model.attn_proj_has_bias=true",
                   "model.tie_word_embeddings=false"])
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    net = build_model(cfg.model, cfg.hardware, tok, 2, 0)
    real = sum(p.size * p.itemsize for p in net.get_parameters())
    counts = module_param_counts(cfg.model, tok.vocab_size)
    assert memory_estimate(cfg, counts, 0, tok.vocab_size)["base_weights"] == real


def test_msrun_commands():
    assert run_command(compose(), REPO, ["lora.rank=4"]) == ["finetune", "lora.rank=4"]
    overrides = ["parallel=dp4", "stages=[plan,train]"]
    cmd = run_command(compose(overrides), REPO, overrides)
    assert "--worker_num=4" in cmd and "--local_worker_num=4" in cmd
    assert cmd[-5:] == ["parallel=dp4", "stages=[train]", f"hydra.run.dir={REPO}", "hydra.output_subdir=null",
                        "hydra/job_logging=stdout"]
    cmd = run_command(compose(["parallel=dp8", "parallel.nodes=2", "parallel.node_rank=1"]), REPO, [])
    assert {"--worker_num=8", "--local_worker_num=4", "--node_rank=1"} <= set(cmd)
    with pytest.raises(ConfigError, match="parallel.nodes=3"):
        resolved(["parallel=dp8", "parallel.nodes=3"])


def test_unknown_vocab_and_missing_tokenizer(tmp_path):
    cfg = resolved(["model.tokenizer.path=/nope/ranks.tiktoken", "parallel=dp2"])
    r = plan_in(cfg, tmp_path)
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["vocab_size"] is None and report["vocab_source"].startswith("unknown")
    assert report["params_per_module"]["model.tok_embeddings"] == 0
    assert r["missing_files"] == ["model.tokenizer.path=/nope/ranks.tiktoken"]
    assert r["plan_tokens_per_step"] == 16 * 2 * 64


@pytest.mark.process
def test_cli_plan_stage_end_to_end(tmp_path, new_store):
    """Needs app.py to run `plan` first and alone (no tokenizer, data or context) for stages=[plan]."""
    tok = shared_path(*INTERNLM_TOK)
    run_dir = tmp_path / "run"
    new_store(tmp_path)
    args = ["stages=[plan]", "model=internlm_7b", "hardware=ascend910b", "parallel=dp4",
            "model.checkpoint=/nope.ckpt", f"model.tokenizer.path={tok}", f"output_root={tmp_path}",
            f"hydra.run.dir={run_dir}"]
    p = run_process([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "0.1146% of base" in p.stdout and "model.checkpoint=/nope.ckpt" in p.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED"
    assert summary["plan_trainable_params"] == 8_388_608 and summary["plan_total_params"] == 7_321_948_160
    assert "--worker_num=4" in summary["msrun_command"] and "model=internlm_7b" in summary["msrun_command"]
    assert "stages=" not in summary["msrun_command"]   # the real run: default stages, not the plan again
    assert not (run_dir / "msrun").exists()            # nothing launched
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        (value,) = db.execute("SELECT value FROM metrics WHERE key = 'plan_trainable_params' AND run_uuid = ?",
                              (summary["mlflow_run_id"],)).fetchone()
    assert value == 8_388_608
    artifacts = [a for a in (tmp_path / "mlartifacts").rglob("plan.json") if summary["mlflow_run_id"] in str(a)]
    assert artifacts, "plan.json not logged as an MLflow artifact"


def test_plan_counts_the_graphs_each_stage_compiles(tmp_path):
    """No data: the most any data could need. Packed training is one graph (two with gradient
    accumulation); evaluation and prediction run at powers of two up to seq_length (6 at 2048);
    unpacked training at its length buckets (21 up to 2048); SQuAD adds a prefill and a step per length."""
    r = plan_in(internlm(["train.batch_size=2"]), tmp_path)
    assert r["plan_train_graphs"] == 1
    report = json.loads((tmp_path / "plan.json").read_text())["compiled_graphs"]
    assert report["predict"] == {"graphs": 6, "exact": False, "lengths": [64, 128, 256, 512, 1024, 2048]}
    assert report["evaluate"]["graphs"] == 6 + 2 * 6            # the demo data set has a SQuAD reading set
    assert plan_in(internlm(["parallel.gradient_accumulation_steps=2"]), tmp_path)["plan_train_graphs"] == 2
    unpacked = plan_in(internlm(["train.packing=false"]), tmp_path)
    assert unpacked["plan_train_graphs"] == 21                 # 64, 80, 96, 112, 128, 160, ... 1792, 2048
    assert plan_in(internlm(["model.seq_length=300"]), tmp_path)["plan_predict_graphs"] == 4   # 64 128 256 300


def test_plan_counts_the_graphs_of_the_prepared_data(ms_cpu, tmp_path):
    """With the data prepared (plan beside other stages), the counts are exact: the demo's 24 test
    prompts (batch 16: two batches, each within 64 tokens) take one evaluation graph."""
    from finetune.data.prepare import prepare
    from finetune.data.tokenizer import load_tokenizer
    from finetune.stages.plan import compiled_graphs

    cfg = resolved([f"output_root={tmp_path}", "dataset.demo.num_words=40", "dataset.demo.squad_questions=0",
                    "stages=[plan,train,evaluate]"])
    tok = load_tokenizer("tiktoken", None)
    graphs = compiled_graphs(cfg, prepare(cfg, tok), tok)
    assert graphs["train"] == {"graphs": 1, "exact": True, "lengths": [64]}
    assert graphs["evaluate"] == {"graphs": 1, "exact": True, "lengths": [64]}
    # 16 demo examples take several rows of 64; one row per micro-step: the accumulating step and the last
    capped = resolved([f"output_root={tmp_path}", "dataset.demo.num_words=40", "dataset.demo.squad_questions=0",
                       "stages=[plan,train]", "hardware.micro_batch_tokens=64"])
    assert compiled_graphs(capped, prepare(capped, tok), tok)["train"] == {"graphs": 2, "exact": True, "lengths": [64]}
    assert compiled_graphs(capped, None, tok)["train"] == {"graphs": 2, "exact": False, "lengths": [64]}
    unpacked = compiled_graphs(resolved([f"output_root={tmp_path}", "dataset.demo.num_words=40",
                                         "dataset.demo.squad_questions=0", "train.packing=false",
                                         "model.seq_length=128"]), None, tok)
    assert unpacked["train"]["exact"] is False and unpacked["train"]["lengths"] == [64, 80, 96, 112, 128]
