"""Hydra config: the seed defaults, every group option, schema failures at start-up, validate(), the CLI."""
from __future__ import annotations

import finetune  # noqa: F401  (first: sets the protobuf env var before anything imports protobuf)

# isort: split
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

import finetune.config.schema
from finetune.config.checks import resolve
from finetune.data.inputs import check_input_files
from finetune.errors import ConfigError
from helpers import run_process

validate = resolve   # compose -> resolve + every cross-key check (what `finetune` runs at start-up)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FINETUNE_BIN = Path(sys.executable).with_name("finetune")
if not FINETUNE_BIN.exists():
    FINETUNE_BIN = REPO / ".venv" / "bin" / "finetune"

finetune.config.schema.register()


def _compose(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides or []))


def _required_keys(group: str, option: Path) -> list[str]:
    """Dotted keys the option's YAML leaves as ``???`` (they must be given on the command line)."""
    raw = OmegaConf.load(option)
    raw.pop("defaults", None)

    def walk(node, prefix):
        for k in node:
            if OmegaConf.is_missing(node, k):
                yield prefix + str(k)
            elif OmegaConf.is_dict(node._get_node(k)):
                yield from walk(node._get_node(k), f"{prefix}{k}.")

    return sorted(walk(raw, group + "."))


def _options() -> list[tuple[str, Path]]:
    return [(g.name, f) for g in sorted(p for p in CONF.iterdir() if p.is_dir()) for f in sorted(g.glob("*.yaml"))]


OPTIONS = _options()
OPTION_IDS = [f"{g}={f.stem}" for g, f in OPTIONS]
WITH_REQUIRED = [(g, f, k) for g, f in OPTIONS for k in _required_keys(g, f)]


def _fill(group: str, option: Path) -> dict[str, str]:
    return {k: f"/x/{k.replace('.', '_')}" for k in _required_keys(group, option)}


# ---------------------------------------------------------------------------------------- defaults

def test_default_composes_with_the_seed_values():
    cfg = _compose()
    assert cfg.lora.rank == 8
    assert cfg.lora.alpha == 16
    assert cfg.lora.dropout == pytest.approx(0.05)
    assert cfg.lora.target_modules == ".*wq|.*wk|.*wv|.*wo"
    o = cfg.optimizer
    assert o.name == "adamw"
    assert (o.beta1, o.beta2) == (pytest.approx(0.9), pytest.approx(0.999))
    assert o.eps == pytest.approx(1e-8)
    assert o.weight_decay == pytest.approx(0.01)
    assert o.warmup_ratio == pytest.approx(0.03)
    assert list(cfg.stages) == ["prepare", "train", "evaluate", "merge", "predict"]
    assert cfg.dataset.name == "demo"
    assert cfg.model.name == "tiny"
    assert cfg.hardware.device_target == "CPU"
    # The whole default resolves (no ??? left, every interpolation valid) and passes the cross-key checks.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate(cfg)


def test_conf_has_options_to_test():
    groups = {g for g, _ in OPTIONS}
    assert {"dataset", "model", "lora", "optimizer", "parallel", "hardware", "tracking"} <= groups
    assert ("dataset", CONF / "dataset" / "mmlu.yaml") in OPTIONS
    assert _required_keys("dataset", CONF / "dataset" / "mmlu.yaml") == ["dataset.path"]
    assert _required_keys("model", CONF / "model" / "internlm_7b.yaml") == ["model.checkpoint", "model.tokenizer.path"]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=OPTION_IDS)
def test_every_option_composes_and_resolves(group, option):
    fill = _fill(group, option)
    cfg = _compose([f"{group}={option.stem}"] + [f"{k}={v}" for k, v in fill.items()])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for k, v in fill.items():
        assert OmegaConf.select(cfg, k) == v
    # The option's own values made it through the schema (not replaced by the schema's defaults).
    raw = OmegaConf.load(option)
    raw.pop("defaults", None)
    for k, v in OmegaConf.to_container(raw, resolve=False).items():
        if isinstance(v, (str, int, float, bool)) and v != "???" and not (isinstance(v, str) and "${" in v):
            assert resolved[group][k] == v, f"{group}.{k}"
    validate(cfg)


# ------------------------------------------------------------------------------------------- models

def test_internlm_7b_shape_and_learning_rate():
    cfg = _compose(["model=internlm_7b", "model.checkpoint=/x/internlm.ckpt", "model.tokenizer.path=/x/tokenizer.model"])
    m = cfg.model
    assert m.vocab_size == 103168
    assert m.hidden_size == 4096
    assert m.num_layers == 32
    assert m.num_heads == 32
    assert m.intermediate_size == 11008
    assert m.qkv_has_bias is True
    assert m.attn_proj_has_bias is True
    assert m.tie_word_embeddings is False
    assert m.tokenizer.kind == "sentencepiece"
    assert cfg.optimizer.learning_rate == pytest.approx(5e-5)
    assert OmegaConf.to_container(cfg, resolve=True)["optimizer"]["learning_rate"] == pytest.approx(5e-5)


def test_tiny_learning_rate_follows_recommended_lr():
    cfg = _compose(["model=tiny"])
    assert cfg.optimizer.learning_rate == pytest.approx(cfg.model.recommended_lr)
    assert cfg.model.recommended_lr == pytest.approx(5e-3)
    cfg = _compose(["model=tiny", "model.recommended_lr=0.123"])
    assert cfg.optimizer.learning_rate == pytest.approx(0.123)
    cfg = _compose(["optimizer.learning_rate=1e-4"])   # an explicit rate wins
    assert cfg.optimizer.learning_rate == pytest.approx(1e-4)


# ------------------------------------------------------------------------ schema failures at start-up

def _chain(exc: BaseException) -> str:
    """str() of the exception and its causes (Hydra puts the key's full name in the cause)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as ei:
        _compose(["lora.rnak=4"])
    assert "rnak" in str(ei.value)
    assert "lora.rnak" in _chain(ei.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as ei:
        _compose(["lora.rank=abc"])
    assert "rank" in str(ei.value)
    assert "lora.rank" in _chain(ei.value)


@pytest.mark.parametrize(("group", "option", "key"), WITH_REQUIRED,
                         ids=[f"{g}={f.stem}:{k}" for g, f, k in WITH_REQUIRED])
def test_required_value_missing_fails_naming_it(group, option, key):
    others = [f"{k}={v}" for k, v in _fill(group, option).items() if k != key]   # leave only `key` missing
    cfg = _compose([f"{group}={option.stem}", *others])
    leaf = key.rsplit(".", 1)[-1]
    with pytest.raises(MissingMandatoryValue) as ei:
        OmegaConf.select(cfg, key, throw_on_missing=True)
    assert leaf in str(ei.value)
    with pytest.raises(MissingMandatoryValue) as ei:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert leaf in str(ei.value)


# ----------------------------------------------------------------------------------------- validate

@pytest.mark.parametrize(("override", "key", "choices"), [
    ("stages=[trian]", "stages[0]", "plan, prepare, train, evaluate, merge, predict, export"),
    ("dataset.style=xx", "dataset.style", "mmlu, cmmlu, contest"),
    ("hardware.loss_scale.kind=dynamik", "hardware.loss_scale.kind", "none, dynamic"),
    ("hardware.compute_dtype=fp16", "hardware.compute_dtype", "float32, float16, bfloat16"),
    ("hardware.mode=graf", "hardware.mode", "graph, pynative"),
    ("hardware.device_target=GPU", "hardware.device_target", "CPU, Ascend"),
    ("model.tokenizer.kind=bpe", "model.tokenizer.kind", "tiktoken, sentencepiece, hf"),
    ("predict.format=csv", "predict.format", "jsonl, npy"),
    ("sweep.direction=up", "sweep.direction", "maximize, minimize"),
    ("optimizer.name=sgd", "optimizer.name", "adamw"),
    ("dataset.name=arc", "dataset.name", "demo, mmlu, cmmlu"),
])
def test_a_typo_in_a_choice_fails_at_compose_naming_key_and_choices(override, key, choices):
    """Typed choices are schema enums: the typo never reaches data preparation or model loading."""
    with pytest.raises(ConfigCompositionException) as ei:
        _compose([override])
    text = _chain(ei.value)
    assert f"expected one of [{choices}]" in text and key in text, text


@pytest.mark.parametrize(("overrides", "needle"), [
    (["stages=[]"], "stages"),
    (["train.epochs=0"], "train.epochs"),
    (["train.max_steps=0"], "train.max_steps"),
    (["lora.rank=0"], "lora.rank: expected >= 1"),
    (["lora.dropout=1.0"], "lora.dropout"),
    (["optimizer.learning_rate=-1"], "optimizer.learning_rate"),
    (["optimizer.learning_rate=nan"], "optimizer.learning_rate"),
    (["eval.squad.max_new_tokens=60"], "eval.squad.max_new_tokens=60 leaves fewer than 8 prompt tokens"),
    (["hardware.max_device_memory=58G"], "hardware.max_device_memory"),
    (["parallel=dp4", "parallel.nodes=3"], "parallel.nodes=3"),
    (["parallel.node_rank=1"], "parallel.node_rank=1: expected 0..0"),
    (["parallel=dp4", "parallel.nodes=2", "parallel.master_port=0"], "parallel.master_port=0 (pick a free port) works on one node only"),
    (["lora.target_modules='(wq'"], "lora.target_modules"),
    (["train.batch_size=0"], "train.batch_size"),
    (["model.num_heads=3"], "num_heads"),
    (["eval.num_shots=-1"], "eval.num_shots"),
    (["parallel.data_parallel=0"], "parallel.data_parallel"),
    (["parallel.pipeline_stage=2"], "parallel.model_parallel/pipeline_stage"),
])
def test_validate_rejects(overrides, needle):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError) as ei:
        validate(cfg)
    assert needle in str(ei.value)


def test_validate_accepts_any_stage_subset():
    validate(_compose(["stages=[evaluate]"]))
    validate(_compose(["stages=[prepare,train]"]))


# ---------------------------------------------------------------------------------------------- CLI

def _cli(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}   # Hydra's short error form
    t0 = time.monotonic()
    proc = run_process([str(FINETUNE_BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


@pytest.mark.process
def test_cli_unknown_key_fails_fast(tmp_path):
    """A key the schema does not have: Hydra's own error (exit 1), naming the override and the key
    (README: `Could not override 'lora.rnak'. ... Key 'rnak' not in 'LoraConfig'`), no traceback,
    nothing written."""
    proc, seconds = _cli(["lora.rnak=4", f"output_root={tmp_path}"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "Could not override 'lora.rnak'." and "Key 'rnak' not in 'LoraConfig'" in lines, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []                   # no run dir, no store
    assert seconds < 30, f"took {seconds:.1f}s: it should fail at composition, before any heavy work"


@pytest.mark.process
def test_cli_config_error_is_one_line_exit_2(tmp_path):
    proc, seconds = _cli(["train.epochs=0", f"output_root={tmp_path}", f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune: error:")]
    assert errors == ["finetune: error: train.epochs: expected >= 1, got 0"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 30, f"took {seconds:.1f}s: validate() should fail before any heavy work"


def test_validate_names_a_missing_required_value():
    cfg = _compose(["model=internlm_7b", "model.tokenizer.path=/x/tokenizer.model"])
    with pytest.raises(ConfigError, match=r"model\.checkpoint: a value is required"):
        validate(cfg)


def test_float16_without_loss_scale_is_refused():
    with pytest.raises(ConfigError, match="hardware.loss_scale.kind"):
        validate(_compose(["hardware.compute_dtype=float16"]))
    validate(_compose(["hardware.compute_dtype=float16", "hardware.loss_scale.kind=dynamic"]))


@pytest.mark.parametrize(("overrides", "needle"), [
    (["parallel=dp2", "parallel.model_parallel=2"], "parallel.model_parallel/pipeline_stage > 1"),
    (["train.save.num_checkpoints=-1"], "train.save.num_checkpoints"),
    (["stages=[merge]", "eval.adapter=/nonexistent/a.ckpt"], "eval.adapter: /nonexistent/a.ckpt not found"),
    (["eval.squad.path=/nonexistent/dev.json"], "eval.squad.path: /nonexistent/dev.json not found"),
    (["stages=[predict]", "predict.input=/nonexistent/q.json"], "predict.input: /nonexistent/q.json not found"),
    (["dataset.general.path=/nonexistent/g.json"], "dataset.general.path: /nonexistent/g.json not found"),
])
def test_config_and_input_files_checked_before_long_work(overrides, needle):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_input_files(validate(cfg))


def test_resolved_config_is_plain_read_only_and_checked():
    """What the stages get: strings (not enums), interpolations resolved, no later edits."""
    from omegaconf.errors import ReadonlyConfigError

    cfg = validate(_compose(["hardware.loss_scale.kind=dynamic"]))
    assert type(cfg.hardware.loss_scale.kind) is str and cfg.hardware.loss_scale.kind == "dynamic"
    assert cfg.optimizer.learning_rate == pytest.approx(5e-3)   # ${model.recommended_lr}, resolved
    assert all(type(s) is str for s in cfg.stages)
    with pytest.raises(ReadonlyConfigError):
        cfg.lora.rank = 4


def test_parallel_micro_batch_num_is_gone():
    """Keys nothing reads are not in the schema: setting one is an error, not a silent no-op."""
    with pytest.raises(ConfigCompositionException, match="micro_batch_num"):
        _compose(["parallel.micro_batch_num=2"])


@pytest.mark.process
def test_cli_help_and_cfg_job(tmp_path):
    """`finetune --help` lists the groups; `finetune --cfg job` prints the composed config."""
    proc, _ = _cli(["--help"], tmp_path)
    assert proc.returncode == 0
    groups = {line.split(":")[0]: line.split(":")[1] for line in proc.stdout.splitlines() if ": " in line
              and line.split(":")[0] in ("dataset", "model", "parallel", "hardware", "lora", "optimizer", "tracking")}
    assert len(groups) == 7, proc.stdout
    assert {"cmmlu", "demo", "mmlu"} <= set(groups["dataset"].replace(",", " ").split())
    assert {"dp2", "dp4", "dp8", "single"} <= set(groups["parallel"].replace(",", " ").split())
    proc, _ = _cli(["--cfg", "job", "lora.rank=4"], tmp_path)
    assert proc.returncode == 0
    printed = OmegaConf.create(proc.stdout)
    assert printed.lora.rank == 4 and printed.model.name == "tiny" and list(printed.stages)[0] == "prepare"


def test_eval_contest_switches_every_choice():
    standard, contest = resolve(_compose()), resolve(_compose(["eval=contest"]))
    assert standard.eval.protocol == "standard" and standard.eval.squad.metric == "official"
    sq = contest.eval.squad
    assert contest.eval.protocol == "contest"
    assert (sq.metric, sq.questions, sq.gold, sq.prompt, sq.truncate, sq.max_new_tokens, sq.limit) == \
        ("mindformers", "first_per_paragraph", "first", "mindformers", "end", 20, None)
    assert (sq.min_f1, sq.min_em) == (53.88, 31.59)
    assert contest.eval.batch_size == standard.eval.batch_size        # the rest is the standard group's
    with pytest.raises(ConfigError, match=r"eval.squad.min_f1: expected a percentage in \[0, 100\]"):
        resolve(_compose(["eval.squad.min_f1=0.5388e3"]))
    with pytest.raises(ConfigCompositionException, match="eval.squad.metric=mindformer"):
        _compose(["eval.squad.metric=mindformer"])   # a typo fails at compose time


def test_squad_prompt_styles_and_truncation_sides():
    from types import SimpleNamespace

    from finetune.data.squad import squad_prompt, squad_prompt_ids

    assert squad_prompt("C.", "Q?") == "C.\n\nQuestion: Q?\nAnswer:"
    assert squad_prompt("C.", "Q?", "mindformers") == (
        "Read the passage and answer the question below.\n\n### Instruction:\nC.\n\n### Input:\nQ?\n\n### Response:")
    tok = SimpleNamespace(bos_id=1, encode=lambda text: [ord(c) for c in text], wrap=lambda ids: [1] + ids)
    record = [{"context": "x" * 40, "question": "why?"}]
    (start,), n = squad_prompt_ids(record, tok, 30, 10, "plain", "start")
    (end,), _ = squad_prompt_ids(record, tok, 30, 10, "plain", "end")
    full = [1] + [ord(c) for c in squad_prompt("x" * 40, "why?")]
    assert n == 1 and len(start) == len(end) == 20
    assert start == [1] + full[-19:] and end == full[:20]   # start: keeps the question; end: keeps the head
    # a chat turn around the prompt (2 ids before, 3 after) stays whole; the passage gives way
    chat = SimpleNamespace(encode=tok.encode, wrap=lambda ids: [7, 7] + ids + [9, 9, 9])
    (start,), _ = squad_prompt_ids(record, chat, 30, 10, "plain", "start")
    (end,), _ = squad_prompt_ids(record, chat, 30, 10, "plain", "end")
    assert start == [7, 7] + full[-15:] + [9, 9, 9] and end == [7, 7] + full[1:16] + [9, 9, 9]


def test_contest_style_needs_generated_answers():
    with pytest.raises(ConfigError, match="dataset.style=contest .* use eval.mc.method=generate"):
        resolve(_compose(["dataset.style=contest"]))
    assert resolve(_compose(["dataset.style=contest", "eval=contest"])).eval.mc.method == "generate"
    assert resolve(_compose(["dataset.style=contest", "stages=[prepare,train]"])).dataset.style == "contest"


def test_bad_input_file_contents_fail_at_start_up(tmp_path):
    """Not only existence: a SQuAD file that is not SQuAD JSON, general records that are not Alpaca,
    an adapter that is not a checkpoint and a dataset.encoding Python does not know each fail before
    any data is prepared, in one line naming the key and the file."""
    from finetune.app import start_up_checks
    from finetune.errors import UserError

    notjson = tmp_path / "dev.json"
    notjson.write_text("{not json")
    nosquad = tmp_path / "other.json"
    nosquad.write_text('{"version": "1.1", "data": [{"title": "t"}]}')
    badgeneral = tmp_path / "general.json"
    badgeneral.write_text('[{"instruction": "x"}]')
    badadapter = tmp_path / "adapter.ckpt"
    badadapter.write_bytes(b"\x00" * 64)
    cases = [([f"eval.squad.path={notjson}"], f"eval.squad.path: {notjson}: not valid UTF-8 JSON"),
             ([f"eval.squad.path={nosquad}"], "eval.squad.path: "),
             ([f"dataset.general.path={badgeneral}"], f"dataset.general.path: {badgeneral}"),
             (["stages=[evaluate]", f"eval.adapter={badadapter}"], f"eval.adapter: cannot read {badadapter}")]
    for overrides, needle in cases:
        with pytest.raises(UserError) as e:
            start_up_checks(resolve(_compose(overrides)), tmp_path / "run", frozenset())
        assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="dataset.encoding='latin-9x': not a text encoding"):
        resolve(_compose(["dataset.encoding=latin-9x"]))


@pytest.mark.process
def test_output_folders_in_the_way_of_a_file_are_one_line(tmp_path):
    """Hydra creates the run dir itself and would stop with a traceback; `finetune` checks first."""
    from finetune.app import output_path_problem

    f = tmp_path / "afile"
    f.write_text("x")
    assert output_path_problem([f"output_root={f}"]) == f"output_root={f}: {f} is a file, not a folder; choose another output_root"
    assert f"{f} is a file" in output_path_problem([f"output_root={tmp_path}", f"hydra.run.dir={f}/run"])
    assert output_path_problem([f"output_root={tmp_path / 'new' / 'deeper'}"]) is None
    proc, _ = _cli([f"output_root={f}"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"finetune: error: output_root={f}: {f} is a file, not a folder; choose another output_root"]
