"""The `finetune` command end to end (subprocess), recorded in a real MLflow SQLite store."""
import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import run_finetune

# the pipeline's own settings, on top of conftest.QUICK
# 13 eval questions: the demo's eval split in order is 8 `kind` questions, then `use`, then `place`
# (2 of each answer letter per subject): 8 + 5, two subjects of unequal size
EVAL = 13
ARGS = ["train.max_steps=4", f"eval.limit={EVAL}", "dataset.demo.squad_questions=10", "eval.squad.max_new_tokens=4",
        "dataset.demo.general_reading=12", "tracking.register_model=demo-mc", "eval.every_n_steps=2",
        "train.early_stopping.metric=during_mc_accuracy", "train.early_stopping.patience=1"]
LETTERS = ("A", "B", "C", "D")
SQUAD_KEYS = ("squad_f1", "squad_em", "squad_f1_base", "squad_em_base", "squad_retention_f1", "squad_retention_em",
              "retained", "contest_score")


def _run(args, root, run="run"):
    return run_finetune(root, run, ARGS + list(args), timeout=600)


def _copy_of_run(tmp: Path, name: str) -> Path:
    """A copy of the fixture's run dir for a test that runs stages in it again (the other tests read
    the fixture's own files, in any order)."""
    return shutil.copytree(tmp / "run", tmp / name, symlinks=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")   # session: xdist may interleave modules of one group
def pipeline(quick_root):
    proc = _run([], quick_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return quick_root, json.loads((quick_root / "run" / "summary.json").read_text())


def test_summary_has_every_figure(pipeline):
    tmp, s = pipeline
    for key in ("mc_accuracy", "mc_accuracy_base", "per_subject_accuracy", "trainable_params", "total_params",
                "trainable_ratio_pct", "trainable_ratio_pct_with_adapter", "train_loss_first", "train_loss_last",
                "train_tokens_per_s", "dataset_rows", "mlflow_run_id"):
        assert key in s, key
    assert s["status"] == "FINISHED"
    assert s["dataset_rows"] == {"dev": 15, "test": 24, "train": 96}   # 2 of 10 words per kind held out
    assert s["trainable_params"] == 28672
    assert s["trainable_ratio_pct"] == pytest.approx(100 * 28672 / s["total_params"])
    assert s["trainable_ratio_pct_with_adapter"] == pytest.approx(100 * 28672 / (s["total_params"] + 28672))
    assert s["train_steps"] == 4 and s["eval_questions"] == EVAL
    assert s["train_questions"] == 96 and s["general_examples"] == 12        # dataset.demo.general_reading
    rows = _rows(tmp / "run" / "eval_predictions.jsonl")
    assert len(rows) == EVAL and [r["subject"] for r in rows] == ["kind"] * 8 + ["use"] * 5
    assert set(s["per_subject_accuracy"]) == set(s["per_subject_accuracy_base"]) == {"kind", "use"}
    assert s["mc_accuracy"] == pytest.approx(sum(r["prediction"] == r["answer"] for r in rows) / EVAL)
    assert s["mc_accuracy_base"] == pytest.approx(sum(r["prediction_base"] == r["answer"] for r in rows) / EVAL)
    assert (tmp / "run" / "adapter.ckpt").is_file()
    # the demo's own reading set (prepare writes it; evaluate scores it when eval.squad.path is null)
    for key in SQUAD_KEYS:
        assert key in s, key
    assert s["squad_questions"] == 10 and s["squad_set"] == str(Path(s["prepared_data"]) / "squad.json")
    assert 0 <= s["squad_em"] <= s["squad_f1"] <= 100 and 0 <= s["squad_em_base"] <= s["squad_f1_base"] <= 100
    if s["squad_f1_base"] > 0:
        assert s["squad_retention_f1"] == pytest.approx(s["squad_f1"] / s["squad_f1_base"])
    else:                                   # undefined ratio: null, and never counted as retained
        assert s["squad_retention_f1"] is None and s["retained"] is False
    assert set(json.loads((tmp / "run" / "squad_predictions.json").read_text())) == {
        f"demo-squad-{i}" for i in range(10)}


def test_evaluate_scores_every_multiple_choice_before_squad(pipeline):
    """The evaluate stage scores the multiple-choice questions with the base and the tuned weights,
    frees those graphs, then decodes SQuAD with both (so decoding never starts on top of the
    scoring graphs' buffers): the order of its lines in app.log."""
    tmp, _ = pipeline
    log = (tmp / "run" / "app.log").read_text()
    marks = ["base model: accuracy", "base + adapter: accuracy", "SQuAD_base (official)", "SQuAD (official)"]
    at = [log.find(m) for m in marks]
    assert min(at) >= 0 and at == sorted(at), list(zip(marks, at))


def test_predict_uses_the_merged_model_and_matches_evaluate(pipeline):
    """The default stages end with merge + predict: predict reads merged.ckpt, and its letter
    probabilities on the eval split equal evaluate's (base + adapter) ones."""
    tmp, s = pipeline
    assert s["predict_model"] == str(tmp / "run" / "merged.ckpt") and Path(s["merged"]).is_file()
    evaluated = {r["id"]: r for r in map(json.loads, (tmp / "run" / "eval_predictions.jsonl").read_text().splitlines())}
    predicted = [json.loads(line) for line in (tmp / "run" / "predictions.jsonl").read_text().splitlines()]
    assert s["predict_records"] == len(predicted) == 24          # the whole eval split (eval.limit is evaluate's)
    for row in predicted:
        if row["id"] in evaluated:
            assert row["prediction"] == evaluated[row["id"]]["prediction"]
            for letter in LETTERS:
                assert row["probabilities"][letter] == pytest.approx(evaluated[row["id"]]["probabilities"][letter],
                                                                     abs=1e-5)
    assert sum(r["id"] in evaluated for r in predicted) == EVAL


def test_identical_runs_with_dropout_give_identical_logs(pipeline):
    """The same command and seed with LoRA dropout on (0.05): the same loss, learning rate and
    gradient norm at every step, and the same adapter. (MindSpore's own CPU Dropout differs between
    processes after its 5th call; the seeded dropout in finetune/model/lora.py does not.)"""
    import mindspore as ms
    import numpy as np

    tmp, _ = pipeline
    proc = _run(["stages=[prepare,train]"], tmp, run="same")
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs = [[",".join(r.split(",")[:4]) for r in (tmp / run / "train_log.csv").read_text().splitlines()]
            for run in ("run", "same")]        # step, loss, lr, grad_norm (tokens_per_s is a timing)
    assert len(logs[0]) == 5 and logs[0] == logs[1]
    a, b = (ms.load_checkpoint(str(tmp / run / "adapter.ckpt")) for run in ("run", "same"))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name].asnumpy(), b[name].asnumpy())


def test_macro_accuracy_is_the_mean_over_subjects(pipeline):
    """mc_accuracy_macro (_base): the mean of the per-subject accuracies, each recomputed from the
    run's eval_predictions.jsonl; with subjects of unequal size it is not the overall accuracy."""
    tmp, s = pipeline
    rows = _rows(tmp / "run" / "eval_predictions.jsonl")
    sizes = {}
    for r in rows:
        sizes[r["subject"]] = sizes.get(r["subject"], 0) + 1
    assert sizes == {"kind": 8, "use": 5}
    for suffix, key in (("", "prediction"), ("_base", "prediction_base")):
        per_subject = {subject: sum(r[key] == r["answer"] for r in rows if r["subject"] == subject) / n
                       for subject, n in sizes.items()}
        assert s[f"per_subject_accuracy{suffix}"] == pytest.approx(per_subject)
        assert s[f"mc_accuracy_macro{suffix}"] == pytest.approx(sum(per_subject.values()) / len(per_subject))
    # the data tells macro from micro (subjects of unequal size and accuracy), else this checks nothing
    assert s["mc_accuracy_macro"] != pytest.approx(s["mc_accuracy"]), s["per_subject_accuracy"]


def test_eval_pad_fraction_is_the_padding_of_the_scored_batches(pipeline):
    """eval_pad_fraction: the padded share of the batches the letter logits were computed on. The 13
    questions' prompts (all under the 64-token window) go in one batch of eval.batch_size rows at
    the smallest bucket, 64 positions: 1 - (prompt tokens) / (rows x 64)."""
    from finetune.data.prepared import load_questions
    from finetune.data.tokenizer import load_tokenizer
    from finetune.evaluation.scoring import build_eval_prompts
    from helpers import QUICK, resolved

    tmp, s = pipeline
    cfg = resolved(QUICK + ARGS + [f"output_root={tmp}"])
    prepared = Path(s["prepared_data"])
    prompts, stats = build_eval_prompts(load_questions(prepared, "eval")[:EVAL], load_questions(prepared, "dev"),
                                        cfg.dataset.style, cfg.eval.num_shots, load_tokenizer("tiktoken", None),
                                        cfg.model.seq_length)
    lengths = [len(p) for p in prompts]
    assert stats["eval_truncated"] == 0 and max(lengths) <= cfg.model.seq_length == 64
    assert cfg.eval.batch_size >= EVAL and s["eval_shapes"] == 1
    assert s["eval_pad_fraction"] == pytest.approx(1 - sum(lengths) / (cfg.eval.batch_size * 64), abs=1e-12)


def test_cached_squad_answers_equal_uncached_decoding(pipeline, ms_cpu):
    """The run's SQuAD answers come from cached decoding (the default); the uncached reference path,
    on base + adapter loaded from the run's files, gives the same tokens, also over 24 new tokens."""
    from finetune.data.squad import load_squad, squad_prompt_ids
    from finetune.data.tokenizer import load_tokenizer
    from finetune.evaluation.squad import answer_text
    from finetune.model.generate import greedy_generate
    from finetune.model.llama import load_model
    from finetune.model.lora import with_adapter
    from helpers import QUICK, resolved

    tmp, s = pipeline
    cfg = resolved(QUICK + ARGS + [f"output_root={tmp}"])
    tok = load_tokenizer("tiktoken", None)
    records = load_squad(s["squad_set"])
    ids, _ = squad_prompt_ids(records, tok, cfg.model.seq_length, 24)
    net = load_model(cfg.model, cfg.hardware, tok, cfg.eval.squad.batch_size, s["base_checkpoint"])
    net = with_adapter(net, tmp / "run" / "adapter.ckpt", cfg.lora, frozenset(), cfg.seed)
    args = (tok.eos_id, tok.pad_id, cfg.model.seq_length, cfg.eval.squad.batch_size)
    long_cached = greedy_generate(net, ids, 24, *args)
    assert long_cached == greedy_generate(net, ids, 24, *args, cache=False)
    assert sum(map(len, long_cached)) > len(ids)              # it generated, not just EOS
    run_ids, _ = squad_prompt_ids(records, tok, cfg.model.seq_length, cfg.eval.squad.max_new_tokens)
    short = greedy_generate(net, run_ids, cfg.eval.squad.max_new_tokens, *args, cache=False)
    written = json.loads((tmp / "run" / "squad_predictions.json").read_text())
    assert written == {r["id"]: answer_text(o, tok) for r, o in zip(records, short)}


def test_mlflow_run_recorded(pipeline):
    from mlflow.tracking import MlflowClient

    tmp, s = pipeline
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.rank"] == "8" and run.data.params["model.name"] == "tiny"
    assert run.data.params["optimizer.learning_rate"] == "0.005"          # resolved interpolation
    assert run.data.tags["dataset"] == "demo" and run.data.tags["hardware"] == "CPU"
    m = run.data.metrics
    assert m["mc_accuracy"] == pytest.approx(s["mc_accuracy"]) and m["trainable_ratio_pct"] > 0
    for key in SQUAD_KEYS:                  # null retention ratios are not logged (not a number)
        if s[key] is not None:
            assert m[key] == pytest.approx(float(s[key])), key
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4
    assert {h.step for h in client.get_metric_history(run.info.run_id, "train_lr")} == {1, 2, 3, 4}
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config_resolved.yaml", "hydra", "eval_predictions.jsonl"} <= arts
    assert "system/cpu_utilization_percentage" in m and "system/system_memory_usage_megabytes" in m   # MLflow's monitor
    # curves during training (eval.every_n_steps=2 of 4 steps), the best evaluation's adapter kept
    for key in ("during_mc_accuracy", "during_general_loss_delta"):
        assert [h.step for h in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    assert s["during_evaluations"] == 2 and s["during_seconds"] > 0 and s["early_stopped"] is False
    best = max(client.get_metric_history(run.info.run_id, "during_mc_accuracy"), key=lambda h: (h.value, -h.step))
    assert s["early_stopping_best_step"] == best.step and s["early_stopping_best"] == best.value
    assert not (tmp / "run" / "adapter-best.ckpt").exists()
    # the data it trained and was scored on, with the prepared data's digest
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    digest = Path(s["prepared_data"]).name.rsplit("-", 1)[1]
    assert inputs["demo-train"] == inputs["demo-test"] == digest and "squad-squad" in inputs
    assert s["datasets"]["demo-train"] == {"digest": digest, "context": "training", "rows": 96,
                                           "source": "generated demo (dataset.demo.seed=0)"}


def test_mlflow_model_loads_in_a_fresh_process_and_matches_predict(pipeline):
    """The merge stage's MLflow model: `mlflow.pyfunc.load_model(uri).predict(df)` in a new Python
    process on the eval questions gives the predict stage's letters and probabilities; the run's
    final metrics are linked to it; tracking.register_model registered it with its figures."""
    import sys

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from helpers import run_process

    tmp, s = pipeline
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert s["mlflow_model_uri"] == f"models:/{s['mlflow_model_id']}"
    questions = json.loads((Path(s["prepared_data"]) / "questions" / "eval.json").read_text())
    df = pd.DataFrame([{"question": q["question"], **dict(zip("ABCD", q["choices"])), "subject": q["subject"]}
                       for q in questions])
    df.to_json(tmp / "model_in.json", orient="records")
    script = (f"import mlflow, pandas as pd; mlflow.set_tracking_uri({uri!r}); "
              f"m = mlflow.pyfunc.load_model({s['mlflow_model_uri']!r}); "
              f"m.predict(pd.read_json({str(tmp / 'model_in.json')!r}, orient='records', dtype=str))"
              f".to_json({str(tmp / 'model_out.json')!r}, orient='records')")
    proc = run_process([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pd.read_json(tmp / "model_out.json", orient="records")
    rows = [json.loads(line) for line in (tmp / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(out) == 24
    assert out["prediction"].tolist() == [r["prediction"] for r in rows]
    for c in LETTERS:
        assert out[f"prob_{c}"].round(6).tolist() == pytest.approx([r["probabilities"][c] for r in rows], abs=1e-6)
    client = MlflowClient(uri)
    model = client.get_logged_model(s["mlflow_model_id"])
    assert model.source_run_id == s["mlflow_run_id"]
    assert model.experiment_id == client.get_run(s["mlflow_run_id"]).info.experiment_id
    assert {m.key for m in model.metrics} >= {"mc_accuracy", "contest_score"}
    version = client.get_model_version("demo-mc", s["registered_model_version"])
    assert version.tags["mc_accuracy"] == str(s["mc_accuracy"]) and version.tags["retained"] == str(s["retained"])


def test_evaluate_stage_alone_reuses_the_run_dir(pipeline):
    from mlflow.tracking import MlflowClient

    tmp, first = pipeline
    run = _copy_of_run(tmp, "evaluate-again")
    (run / "eval_predictions.jsonl").unlink()   # evaluate must write it again
    # lora.rank=8 (the adapter's own value) is no conflict; lora.dropout does not change the weights
    proc = _run(["stages=[evaluate]", "eval.base=false", "eval.checkpoints=true", "lora.rank=8", "lora.dropout=0.3"],
                tmp, run=run.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    # this run's own figures only: evaluated again (same adapter, same questions), nothing stale
    assert s["stages"] == ["evaluate"] and s["evaluate_seconds"] > 0
    assert s["mc_accuracy"] == pytest.approx(first["mc_accuracy"])
    assert len((run / "eval_predictions.jsonl").read_text().splitlines()) == EVAL
    for stale in ("train_loss_first", "train_steps", "mc_accuracy_base", "predict_output", "merged"):
        assert stale not in s, stale
    assert s["mlflow_run_id"] != first["mlflow_run_id"]
    # the first run's summary is kept whole, under runs, with its own MLflow id
    assert [r["mlflow_run_id"] for r in s["runs"]][-1] == first["mlflow_run_id"]
    assert s["runs"][-1]["train_loss_first"] == first["train_loss_first"]
    metrics = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(s["mlflow_run_id"]).data.metrics
    assert "mc_accuracy" in metrics and "train_loss_first" not in metrics and "mc_accuracy_base" not in metrics
    # 4 steps, 5 checkpoints asked -> one per step; the run's adapter is the one early stopping kept
    # (the best of its evaluations at steps 2 and 4), so its checkpoint scores what the adapter does
    scores = s["checkpoint_scores"]
    assert [c["step"] for c in scores] == [1, 2, 3, 4]
    assert first["early_stopping_best_step"] in (2, 4)
    kept = next(c for c in scores if c["step"] == first["early_stopping_best_step"])
    assert kept["mc_accuracy"] == pytest.approx(s["mc_accuracy"])
    assert s["best_checkpoint_mc_accuracy"] == max(c["mc_accuracy"] for c in scores)
    assert s["best_checkpoint_step"] == min(c["step"] for c in scores if c["mc_accuracy"] == max(
        c["mc_accuracy"] for c in scores))


def test_contest_protocol_on_the_demo(pipeline):
    """eval=contest: SQuAD under MindFormers' EmF1Metric on the first question of each paragraph
    (the demo's 10 questions sit in 5 passages), with the absolute bars; the standard keys stay."""
    tmp, first = pipeline
    # the contest's SQuAD template needs a longer window than the demo's 64; the adapter's own base
    # (model.checkpoint), not one pretrained again at that length
    proc = _run(["stages=[evaluate]", "eval=contest", "eval.limit=4", "model.seq_length=128",
                 f"model.checkpoint={first['base_checkpoint']}", f"eval.adapter={tmp / 'run' / 'adapter.ckpt'}"],
                tmp, run="contest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp / "contest" / "summary.json").read_text())
    assert s["eval_protocol"] == "contest" and s["squad_metric"] == "mindformers"
    assert s["squad_questions"] == 5 and "SQuAD (mindformers)" in proc.stderr + proc.stdout
    assert isinstance(s["retained_absolute"], bool)
    assert s["retained_absolute"] == (s["squad_f1"] >= 53.88 and s["squad_em"] >= 31.59)
    assert 0 <= s["squad_em"] <= 100 and 0 <= s["squad_f1"] <= 100
    # multiple choice by generation: the letter read from each greedy answer (docs/evaluation.md: "The
    # right option is X", else the first A-D standing alone; none = unparsed, counted and wrong)
    assert s["eval_mc_method"] == "generate" and s["eval_questions"] == 4
    rows = _rows(tmp / "contest" / "eval_predictions.jsonl")
    assert len(rows) == 4 and all(isinstance(r["generation"], str) for r in rows)
    for r in rows:
        found = (re.search(r"the right option is\s*:?\s*\(?([ABCD])(?![A-Za-z])", r["generation"], re.IGNORECASE)
                 or re.search(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])", r["generation"]))
        assert r["prediction"] == (found.group(1) if found else None), r
    assert s["mc_unparsed"] == sum(r["prediction"] is None for r in rows)
    assert s["mc_unparsed_base"] == sum(r["prediction_base"] is None for r in rows)
    assert s["mc_accuracy"] == sum(r["prediction"] == r["answer"] for r in rows) / 4
    ratio = s["trainable_params"] / s["total_params"]
    assert s["contest_score"] == pytest.approx((1 - 10 * ratio) * 0.3 + s["mc_accuracy"] * 0.7)


def test_failure_is_one_line_and_marks_the_run_failed(pipeline):
    from mlflow.tracking import MlflowClient

    tmp, _ = pipeline
    proc = _run(["stages=[evaluate]", "eval.adapter=/nonexistent/adapter.ckpt"], tmp, run="bad")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune: error:")]
    assert errors == ["finetune: error: eval.adapter: /nonexistent/adapter.ckpt not found"]
    assert "Traceback" not in proc.stderr
    s = json.loads((tmp / "bad" / "summary.json").read_text())
    assert s["status"] == "FAILED"
    run = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(s["mlflow_run_id"])
    assert run.info.status == "FAILED"


def test_squad_retention_and_predict_stage(pipeline):
    """evaluate with a SQuAD-format file + predict on Alpaca records (multiple choice and free text)."""
    import numpy as np

    tmp, first = pipeline
    run = _copy_of_run(tmp, "squad-and-predict")
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "she ate a juicy blickem.", "qas": [
            {"id": "q1", "question": "What did she eat?", "answers": [{"text": "a juicy blickem", "answer_start": 8}]},
            {"id": "q2", "question": "Who ate?", "answers": [{"text": "she", "answer_start": 0}]}]}]}]}
    (tmp / "squad.json").write_text(json.dumps(squad))
    alpaca = [{"id": "mc1", "instruction": "The following are multiple choice questions (with answers) about kind.",
               "input": "What kind of thing is a zoomp?\nA. fruit\nB. animal\nC. tool\nD. colour\nAnswer:"},
              {"id": "free1", "instruction": "the dog ran across the", "input": ""}]
    (tmp / "in.json").write_text(json.dumps(alpaca))
    proc = _run(["stages=[evaluate,predict]", f"eval.squad.path={tmp / 'squad.json'}",
                 f"predict.input={tmp / 'in.json'}", "predict.format=npy", "eval.squad.max_new_tokens=4"],
                tmp, run=run.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    for key in ("squad_f1", "squad_em", "squad_f1_base", "squad_em_base", "squad_retention_f1",
                "squad_retention_em", "retained", "contest_score"):
        assert key in s, key
    assert s["squad_questions"] == 2
    ratio = s["trainable_params"] / s["total_params"]
    assert s["contest_score"] == pytest.approx((1 - 10 * ratio) * 0.3 + s["mc_accuracy"] * 0.7)
    base_preds = json.loads((run / "squad_predictions_base.json").read_text())
    assert set(base_preds) == {"q1", "q2"}
    rows = _rows(run / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["mc1", "free1"]
    assert rows[0]["prediction"] in LETTERS and sum(rows[0]["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert isinstance(rows[1]["prediction"], str) and "probabilities" not in rows[1]
    npy = np.load(run / "results.npy")
    assert npy.tolist() == ["ABCD".index(rows[0]["prediction"]), -1]
    assert s["predict_examples_per_s"] > 0


def _start_up_error(tmp, args, run, given=frozenset()) -> str:
    """The start-up checks of a `finetune` job in run dir tmp/run, in process: the one-line message
    of the error they raise (the command prints it as `finetune: error: ...` and exits 2, tested in
    test_failure_is_one_line_and_marks_the_run_failed)."""
    from finetune.app import start_up_checks
    from finetune.errors import UserError
    from helpers import QUICK, resolved

    with pytest.raises(UserError) as e:
        start_up_checks(resolved([*QUICK, *ARGS, f"output_root={tmp}", *args]), tmp / run, frozenset(given))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_malformed_predict_input_is_one_line(pipeline):
    tmp, _ = pipeline
    (tmp / "bad.json").write_text(json.dumps([{"instruction": "ok"}, {"input": "no instruction"}]))
    message = _start_up_error(tmp, ["stages=[predict]", f"predict.input={tmp / 'bad.json'}"], "badpred")
    assert "record [1]" in message and "bad.json" in message


def test_conflicting_lora_override_is_one_line(pipeline):
    """The adapter file records its LoRA shape; a different lora.* on the command line is refused."""
    tmp, _ = pipeline
    message = _start_up_error(tmp, ["stages=[evaluate]", "lora.rank=4"], "run", given={"lora.rank"})
    assert message == (f"lora.rank=4 was given, but {tmp / 'run' / 'adapter.ckpt'} was trained with "
                       f"lora.rank=8; drop the override (the adapter's own value is used) or evaluate another adapter")


@pytest.mark.process
def test_predict_on_a_real_mmlu_csv(shared, tmp_path):
    """The seed's flow ends with predicting a test file: an MMLU CSV in, one answer per row out.
    model.seq_length=192 is shorter than some of its prompts: those keep their end (the question),
    as evaluate does, and are counted; nothing is refused after the earlier stages ran."""
    import numpy as np

    from finetune.data import prompts
    from finetune.data.mmlu import read_mmlu_file
    from finetune.data.tokenizer import load_tokenizer

    src = shared / "data" / "mmlu" / "test" / "abstract_algebra_test.csv"
    tok = load_tokenizer("tiktoken", None)
    lengths = [1 + len(tok.encode(prompts.build_prompt(q, "mmlu")))
               for q in read_mmlu_file(src, "input", "abstract_algebra", answer_required=False)]
    proc = run_finetune(tmp_path, "run", ["model.pretrain.epochs=0", "model.seq_length=192", "stages=[predict]",
                                          f"predict.input={src}", "predict.format=npy", "predict.batch_size=20"],
                        quick=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(100)]          # every row of the file, in order
    assert all(r["prediction"] in LETTERS and len(r["probabilities"]) == 4 for r in rows)
    npy = np.load(tmp_path / "run" / "results.npy")
    assert npy.shape == (100,) and npy.tolist() == ["ABCD".index(r["prediction"]) for r in rows]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["predict_truncated"] == sum(n > 192 for n in lengths) > 0
    assert 0 <= s["predict_pad_fraction"] < 0.35 and s["predict_shapes"] >= 2   # length buckets 64..192
