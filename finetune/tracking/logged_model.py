"""The merged model as an MLflow model that loads and predicts anywhere this package is installed:
an MLflow 3 LoggedModel of the pyfunc flavour with our own loader (MultipleChoiceModel below).

Artifacts: the merged checkpoint, the model's config (model + hardware groups, prompt style, seed,
batch size) and the tokenizer file (none for the demo's built-in encoding).
Signature: a DataFrame of questions (question, A, B, C, D, subject) -> prediction (A-D) and
prob_A..prob_D: the `predict` stage's zero-shot letter scoring of the same merged model, so
`mlflow.pyfunc.load_model(uri).predict(df)` gives exactly the predict stage's answers.

Logged by the merge stage (tracking.log_model, default true); tracking.register_model=NAME also
registers it in the Model Registry at the end of a FINISHED run, tagged with mc_accuracy, retained
and contest_score.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

log = logging.getLogger(__name__)

COLUMNS = ("question", "A", "B", "C", "D", "subject")
OUTPUTS = ("prediction", "prob_A", "prob_B", "prob_C", "prob_D")


@contextlib.contextmanager
def mlflow_defaults(uri: str, experiment_id: str | None = None):
    """MLflow's process-wide tracking URI (and active experiment) set to this run's for the calls
    that use them rather than their client's (Model.log; the registry store resolving models:/
    URIs), and put back after."""
    import mlflow
    from mlflow.tracking import fluent

    previous, previous_experiment = mlflow.get_tracking_uri(), fluent._active_experiment_id
    mlflow.set_tracking_uri(uri)
    try:
        if experiment_id is not None:
            mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        fluent._active_experiment_id = previous_experiment


class MultipleChoiceModel(mlflow.pyfunc.PythonModel):
    """pyfunc loader: builds the model from the logged config and checkpoint once, then scores the
    letters of each question at the last prompt position (finetune/evaluation/scoring.py)."""

    def load_context(self, context):
        from omegaconf import OmegaConf

        from finetune.data.tokenizer import load_tokenizer
        from finetune.model.llama import load_model, setup_context

        self.cfg = OmegaConf.load(context.artifacts["config"])
        tokenizer = context.artifacts.get("tokenizer")
        self.tok = load_tokenizer(self.cfg.model.tokenizer.kind, tokenizer, self.cfg.model.tokenizer.chat_template)
        setup_context(self.cfg.hardware, self.cfg.seed)
        self.net = load_model(self.cfg.model, self.cfg.hardware, self.tok, self.cfg.batch_size,
                              context.artifacts["checkpoint"], what="merged model")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # (typed: MLflow warns about an untyped predict; a DataFrame hint leaves the signature to us)
        from finetune.data import prompts
        from finetune.data.records import Question
        from finetune.errors import DataError
        from finetune.evaluation.scoring import choose, letter_logits, letter_token_ids

        missing = [c for c in COLUMNS if c not in model_input.columns]
        if missing:
            raise DataError(f"model input: missing column(s) {missing}; expected {list(COLUMNS)}")
        style, seq = self.cfg.style, self.cfg.model.seq_length
        ids = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            q = Question(id=str(i), subject=str(row.subject), question=str(row.question).strip(),
                         choices=tuple(str(getattr(row, c)).strip() for c in "ABCD"), answer="A", source="input")
            x = self.tok.wrap(self.tok.encode(prompts.build_prompt(q, style)))
            ids.append(x[-seq:])   # the predict stage's rule: a prompt that does not fit keeps its end
        logits = letter_logits(self.net, ids, letter_token_ids(self.tok, style), self.cfg.batch_size, seq,
                               self.tok.pad_id, {})
        preds, probs = choose(logits)
        return pd.DataFrame({"prediction": preds, **{f"prob_{c}": probs[:, k].astype(float) for k, c in enumerate("ABCD")}},
                            columns=list(OUTPUTS))


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", c) for c in COLUMNS]),
                          outputs=Schema([ColSpec("string", "prediction")] +
                                         [ColSpec("double", f"prob_{c}") for c in "ABCD"]))


def log_merged_model(ctx, merged: Path) -> dict:
    """Log run_dir/merged.ckpt as the run's MLflow model; {"mlflow_model_id", "mlflow_model_uri"}."""
    import mlflow
    from mlflow.models import Model
    from omegaconf import OmegaConf

    cfg, tracker = ctx.cfg, ctx.tracker
    if not tracker.client or not cfg.tracking.log_model:
        return {}
    if cfg.dataset.style == "contest" or cfg.eval.mc.method == "generate":
        log.info("tracking.log_model: the MLflow model scores letter logits; this run's answers are generated, "
                 "so no model is logged")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model_config.yaml"
        model = OmegaConf.to_container(cfg.model)
        model["checkpoint"] = None   # the merged checkpoint is the model
        OmegaConf.save(OmegaConf.create({"model": model, "hardware": OmegaConf.to_container(cfg.hardware),
                                         "style": cfg.dataset.style, "seed": cfg.seed,
                                         "batch_size": cfg.predict.batch_size}), config)
        artifacts = {"checkpoint": str(merged), "config": str(config)}
        if cfg.model.tokenizer.kind == "hf":   # the tokenizer as a tokenizer.json folder (not the GGUF it came in)
            from finetune.data.hf_tokenizer import hf_tokenizer_files

            folder = Path(tmp) / "tokenizer"
            folder.mkdir()
            for name, data in hf_tokenizer_files(ctx.tok, cfg.model.seq_length).items():
                (folder / name).write_bytes(data)
            artifacts["tokenizer"] = str(folder)
        elif cfg.model.tokenizer.path:
            tok_copy = Path(tmp) / Path(cfg.model.tokenizer.path).name
            shutil.copy(cfg.model.tokenizer.path, tok_copy)
            artifacts["tokenizer"] = str(tok_copy)
        # Model.log works through MLflow's default client and puts the LoggedModel in the active
        # experiment: both are the run's for the call. (Its artifact progress bars: not on our console.)
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with mlflow_defaults(tracker.uri, tracker.client.get_run(tracker.run_id).info.experiment_id):
            info = Model.log(None, mlflow.pyfunc, name="model", run_id=tracker.run_id,
                             python_model=MultipleChoiceModel(), artifacts=artifacts, signature=signature(),
                             pip_requirements=_requirements())
    log.info("MLflow model %s logged (%s)", info.model_id, info.model_uri)
    return {"mlflow_model_id": info.model_id, "mlflow_model_uri": info.model_uri}


def _requirements() -> list[str]:
    """This package's own pins (MLflow would otherwise import-trace the model, which takes minutes)."""
    from importlib.metadata import requires, version

    return [f"finetune=={version('finetune')}"] + [r for r in (requires("finetune") or []) if "extra ==" not in r]


def register(summary: dict, name: str, uri: str) -> str | None:
    """Register the run's logged model as a new version of `name`, tagged with its figures."""
    from mlflow.tracking import MlflowClient

    if not summary.get("mlflow_model_uri"):
        log.warning("tracking.register_model=%s: this run logged no MLflow model; nothing registered", name)
        return None
    client = MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    tags = {k: str(summary[k]) for k in ("mc_accuracy", "retained", "contest_score") if k in summary}
    with mlflow_defaults(uri):   # a SQLite registry resolves models:/ through the default client
        version = client.create_model_version(name, summary["mlflow_model_uri"], run_id=summary.get("mlflow_run_id"),
                                              tags=tags, model_id=summary.get("mlflow_model_id"))
    log.info("registered %s version %s", name, version.version)
    return str(version.version)
