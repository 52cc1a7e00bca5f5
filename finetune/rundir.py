"""Every file a run writes into its run dir (hydra.run.dir), named once. Stages write them and
read each other's through these names, so any stage can be re-run alone on a finished run dir.

  summary.json                 status, every figure of the run, per-stage peak memory (app)
  .hydra/, config_resolved.yaml  the composed and the resolved config
  adapter.ckpt                 the LoRA adapter the train stage ends with (the best one under early stopping)
  adapter-best.ckpt            while training with early stopping: the best adapter so far
  checkpoints/                 adapter-step<N>.ckpt + state-step<N>.ckpt pairs, index.json (sizes and
                               checksums of the complete pairs), run.json (the settings they were made with)
  train_log.csv                one row per optimizer step (loss, lr, grad norm, tokens/s, loss scale)
  eval_predictions.jsonl       per evaluated question: base and tuned choice, probabilities
  squad_predictions<tag>.json  question id -> answer text, per evaluated model (base, tuned, a step)
  merged.ckpt                  base + adapter merged (checkpoints/merged-step<N>.ckpt with merge.all)
  predictions.jsonl, results.npy   the predict stage's output
  plan.json                    the dry-run plan
  hf/                          the merged model as a Hugging Face folder (export.output unset)
  report.md, per_subject_accuracy.csv, accuracy.png, curves.png   the run report
  mlflow_pending.json          MLflow calls the store did not take (python -m finetune.tracking sync)
"""
SUMMARY = "summary.json"
RESOLVED_CONFIG = "config_resolved.yaml"
ADAPTER = "adapter.ckpt"
BEST_ADAPTER = "adapter-best.ckpt"
CHECKPOINTS = "checkpoints"
CHECKPOINT_INDEX = "index.json"
RUN_RECORD = "run.json"
TRAIN_LOG = "train_log.csv"
EVAL_PREDICTIONS = "eval_predictions.jsonl"
MERGED = "merged.ckpt"
PREDICTIONS = "predictions.jsonl"
RESULTS = "results.npy"
PLAN = "plan.json"
EXPORT = "hf"
REPORT = "report.md"
PER_SUBJECT = "per_subject_accuracy.csv"
ACCURACY_PLOT = "accuracy.png"
CURVES_PLOT = "curves.png"
PENDING = "mlflow_pending.json"


def squad_predictions(tag: str) -> str:
    """squad_predictions<tag>.json: tag "_base" / "_tuned" (or a checkpoint's step)."""
    return f"squad_predictions{tag}.json"
