"""MLflow tracking against a real SQLite store (no mocks), plus flatten / sanitize."""
from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from finetune.tracking.store import default_uri
from finetune.tracking.tracker import MAX_PARAM_VALUE, Tracker, flatten, sanitize


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def store(tmp_path_factory, new_store):
    """One SQLite store for the module, a copy of the session's template."""
    root = tmp_path_factory.mktemp("mlflow")
    return root, new_store(root)


def _tracker(store, experiment: str, **kw) -> Tracker:
    root, uri = store
    return Tracker(uri=uri, experiment=experiment, run_name="r", artifact_root=root / "art",
                   tags={"dataset": "demo"}, **kw)


def test_default_uri_is_an_absolute_sqlite_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_uri("out") == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_run_round_trip(store, tmp_path):
    root, uri = store
    t = _tracker(store, "t")
    assert t.run_id
    t.log_params(flatten({"lora": {"rank": 8, "alpha": 16.0}, "stages": ["prepare", "train"],
                          "model": {"tokenizer": {"kind": "tiktoken", "path": None}}}))
    for step, loss in ((1, 2.5), (2, 1.25), (3, 0.5)):
        t.log_metrics({"loss": loss, "lr": 1e-3 * step}, step=step)
    t.log_metrics({"mc_accuracy": 0.75, "acc.high school(x)": 0.5})
    f = tmp_path / "summary.json"
    f.write_text('{"status": "FINISHED"}')
    t.log_artifact(f)
    t.log_artifact(tmp_path / "does_not_exist.json")   # absent files are skipped, not an error
    t.end("FINISHED")

    c = MlflowClient(uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r"
    assert run.data.params == {"lora.rank": "8", "lora.alpha": "16.0", "stages": "['prepare', 'train']",
                               "model.tokenizer.kind": "tiktoken", "model.tokenizer.path": "None"}
    assert run.data.tags["dataset"] == "demo"
    hist = sorted((m.step, m.value) for m in c.get_metric_history(t.run_id, "loss"))
    assert hist == [(1, 2.5), (2, 1.25), (3, 0.5)]
    assert [m.step for m in sorted(c.get_metric_history(t.run_id, "lr"), key=lambda m: m.step)] == [1, 2, 3]
    assert run.data.metrics["loss"] == 0.5          # latest = the last step
    assert run.data.metrics["mc_accuracy"] == 0.75
    assert run.data.metrics["acc.high school_x_"] == 0.5   # sanitized name
    assert [a.path for a in c.list_artifacts(t.run_id)] == ["summary.json"]
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "t"
    assert exp.artifact_location == (root / "art").resolve().as_uri()


def test_second_run_reuses_the_experiment(store):
    a, b = _tracker(store, "t2"), _tracker(store, "t2")
    a.end("FINISHED")
    b.end("FINISHED")
    c = MlflowClient(store[1])
    assert c.get_run(a.run_id).info.experiment_id == c.get_run(b.run_id).info.experiment_id
    assert a.run_id != b.run_id


def test_failed_run_and_skipped_metric_values(store):
    t = _tracker(store, "t3")
    t.log_metrics({"ok": 1.0, "count": 3, "nan": math.nan, "inf": math.inf, "neg_inf": -math.inf,
                   "flag": True, "text": "x", "none": None})
    t.log_metrics({"loss": math.nan}, step=1)   # a non-finite step value is dropped too
    t.log_metrics({"loss": 0.25}, step=2)
    t.end("FAILED")

    c = MlflowClient(store[1])
    run = c.get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    assert run.data.metrics == {"ok": 1.0, "count": 3.0, "loss": 0.25}
    assert [(m.step, m.value) for m in c.get_metric_history(t.run_id, "loss")] == [(2, 0.25)]
    for name in ("nan", "inf", "neg_inf", "flag", "text", "none"):
        assert c.get_metric_history(t.run_id, name) == []


def test_end_flushes_buffered_step_metrics(store):
    t = _tracker(store, "t4")
    t.log_metrics({"loss": 1.0}, step=1)        # buffered (fewer than FLUSH_EVERY points)
    t.end("KILLED")
    c = MlflowClient(store[1])
    assert c.get_run(t.run_id).info.status == "KILLED"
    assert [(m.step, m.value) for m in c.get_metric_history(t.run_id, "loss")] == [(1, 1.0)]


def test_many_params_are_batched(store):
    t = _tracker(store, "t5")
    params = flatten({"g": {f"k{i:03d}": i for i in range(250)}})   # > MLflow's 100 per log_batch
    t.log_params(params)
    t.end("FINISHED")
    assert MlflowClient(store[1]).get_run(t.run_id).data.params == params


def test_tracker_without_uri_is_a_no_op(tmp_path):
    t = Tracker()
    assert t.client is None and t.run_id is None
    t.log_params({"a": "1"})
    t.log_metrics({"a": 1.0}, step=1)
    t.log_metrics({"a": 1.0})
    t.set_tags({"a": 1})
    t.log_artifact(tmp_path)
    t.flush()
    t.end("FINISHED")


# ---------------------------------------------------------------------------------------- flatten

def test_flatten_nested_dicts_get_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2.5}}, "e": "x", "f": None, "g": True}) == {
        "a.b": "1", "a.c.d": "2.5", "e": "x", "f": "None", "g": "True"}


def test_flatten_lists_stay_one_value():
    assert flatten({"c": [1, 2], "s": ["prepare", "train"], "n": {"l": [{"x": 1}]}}) == {
        "c": "[1, 2]", "s": "['prepare', 'train']", "n.l": "[{'x': 1}]"}


def test_flatten_truncates_long_values():
    out = flatten({"long": "y" * 10000, "nested": {"list": list(range(5000))}, "short": "z" * MAX_PARAM_VALUE})
    assert MAX_PARAM_VALUE == 6000
    assert out["long"] == "y" * 6000
    assert len(out["nested.list"]) == 6000
    assert out["nested.list"].startswith("[0, 1, 2")
    assert out["short"] == "z" * 6000


def test_flatten_prefix():
    assert flatten({"a": 1}, "p.") == {"p.a": "1"}
    assert flatten({}) == {}


# --------------------------------------------------------------------------------------- sanitize

@pytest.mark.parametrize(("name", "expected"), [
    ("loss", "loss"),
    ("acc.high_school_math", "acc.high_school_math"),
    ("eval/mc-accuracy 0.5", "eval/mc-accuracy 0.5"),
    ("acc(x)", "acc_x_"),
    ("a:b,c;d=e", "a_b_c_d_e"),
    ("acc.中国语言文学", "acc.中国语言文学"),   # unicode letters are alphanumeric (MLflow's \w accepts them)
    ("", ""),
])
def test_sanitize(name, expected):
    assert sanitize(name) == expected


def test_sanitized_names_are_accepted_by_mlflow(store):
    t = _tracker(store, "t6")
    names = ["acc(x)", "a:b,c;d=e", "acc.中国语言文学", "p@q#r"]
    t.log_metrics({n: 1.0 for n in names})
    t.end("FINISHED")
    assert set(MlflowClient(store[1]).get_run(t.run_id).data.metrics) == {sanitize(n) for n in names}


@pytest.mark.parametrize("text, expected", [
    ("tracking.uri=http://alice:pw@host:5000", "tracking.uri=http://alice:***@host:5000"),
    ("uri: https://u:p%40ss@h:1/x", "uri: https://u:***@h:1/x"),
    ("db_password: hunter2", "db_password: ***"),
    ('{"token": "abc", "n": 1}', '{"token": "***", "n": 1}'),
    ("http://h/x?api_key=zzz&page=2", "http://h/x?api_key=***&page=2"),
    # not secrets: no password in the URI, key names that only contain the word
    ("http://host:5000 sqlite:////tmp/a.db", "http://host:5000 sqlite:////tmp/a.db"),
    ("max_new_tokens: 16\ntokenizer: {path: x}", "max_new_tokens: 16\ntokenizer: {path: x}"),
])
def test_redact(text, expected):
    from finetune.runtime.redact import redact

    assert redact(text) == expected


def test_redact_params_by_key_name_and_value():
    from finetune.runtime.redact import redact_params, split_credentials

    assert redact_params({"tracking.uri": "http://a:b@c", "x.api_key": "k1", "x.secret": "None",
                          "eval.squad.max_new_tokens": "16"}) == {
        "tracking.uri": "http://a:***@c", "x.api_key": "***", "x.secret": "None", "eval.squad.max_new_tokens": "16"}
    assert split_credentials("http://u:p%40ss@h:1/x") == ("http://h:1/x", "u", "p@ss")
    assert split_credentials("sqlite:////u:p@x.db") == ("sqlite:////u:p@x.db", None, None)


def test_dataset_inputs_name_source_digest_and_context(store, tmp_path):
    """Two runs on the same prepared data log the same digests; the run page lists the training
    set (context training), the evaluation set and the SQuAD set (context evaluation) with their
    sources, row counts and schemas."""
    import hashlib
    import json

    from finetune.data.prepare import prepare
    from finetune.data.tokenizer import load_tokenizer
    from finetune.tracking.lineage import dataset_inputs, to_mlflow
    from helpers import QUICK, resolved

    cfg = resolved([*QUICK, f"output_root={tmp_path}", "dataset.demo.squad_questions=10"])
    prepared = prepare(cfg, load_tokenizer("tiktoken", None))
    runs = []
    for _ in range(2):
        t = _tracker(store, "lineage")
        t.log_inputs(to_mlflow(dataset_inputs(cfg, prepared)))
        t.end("FINISHED")
        runs.append(MlflowClient(store[1]).get_run(t.run_id).inputs.dataset_inputs)
    digest = prepared.name.rsplit("-", 1)[1]
    squad_digest = hashlib.sha256((prepared / "squad.json").read_bytes()).hexdigest()[:12]   # the file's sha256
    assert squad_digest != digest
    for inputs in runs:
        got = {d.dataset.name: (d.dataset.digest, {tag.key: tag.value for tag in d.tags}["mlflow.data.context"],
                                json.loads(d.dataset.profile)["num_rows"]) for d in inputs}
        assert got == {"demo-train": (digest, "training", 96), "demo-test": (digest, "evaluation", 24),
                       "squad-squad": (squad_digest, "evaluation", 10)}
        squad = next(d.dataset for d in inputs if d.dataset.name == "squad-squad")
        assert json.loads(squad.source)["uri"] == str(prepared / "squad.json")
        assert "question" in squad.schema and "generated demo" in next(
            d.dataset.source for d in inputs if d.dataset.name == "demo-train")
    assert [sorted((d.dataset.name, d.dataset.digest) for d in r) for r in runs][0] == \
        [sorted((d.dataset.name, d.dataset.digest) for d in r) for r in runs][1]
    # other data, another digest (one more made-up word changes the questions)
    other = prepare(resolved([*QUICK, f"output_root={tmp_path}", "dataset.demo.num_words=44"]),
                    load_tokenizer("tiktoken", None))
    assert {d["name"]: d["digest"] for d in dataset_inputs(cfg, other)}["demo-train"] != digest


def test_resume_reopens_the_run_or_tags_a_new_one(store):
    """train.resume=true continues the interrupted training's MLflow run (RUNNING again, step
    metrics after the last logged step only); if that run is gone, a new run names it."""
    root, uri = store
    first = _tracker(store, "resume")
    first.log_params({"lr": "0.1", "train.resume": "False"})
    first.log_metrics({"loss": 3.0}, step=1)
    first.log_metrics({"loss": 2.0}, step=2)
    first.end("KILLED")
    again = _tracker(store, "resume", resume_run_id=first.run_id)
    client = MlflowClient(uri)
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "RUNNING"
    assert again.continue_steps("loss") == 2
    again.log_params({"lr": "0.1", "train.resume": "True", "new": "1"})
    again.log_metrics({"loss": 2.5}, step=2)          # recomputed after the checkpoint: not logged twice
    again.log_metrics({"loss": 1.0}, step=3)
    again.end("FINISHED")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and not again.offline
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert run.data.params == {"lr": "0.1", "train.resume": "False", "new": "1"}
    assert run.data.tags["resume_changed_params"] == "train.resume=True"
    gone = _tracker(store, "resume", resume_run_id="0" * 32)
    assert gone.run_id != "0" * 32 and client.get_run(gone.run_id).data.tags["resumed_from_run_id"] == "0" * 32
    gone.end("FINISHED")
