"""Structured configs: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

Every YAML in conf/<group>/ starts from its schema (``defaults: [<group>_schema]`` via
conf/config.yaml's ``schema`` entry), so an unknown key, a wrong type or a missing ``???``
value fails at start-up with the key's name, before any data is read or model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A fixed set of string values for a key. OmegaConf checks them when the config is composed:
    `hardware.loss_scale.kind=dynamik` fails at once with "Invalid value 'dynamik', expected one
    of [none, dynamic]" and the key. (str + Enum: a member equals its string; app.run hands the
    stages plain strings.)"""

    def __str__(self) -> str:
        return self.value


class Stage(Choice):
    # Run order, whatever order `stages` lists them in. `plan` is a dry run (no weights, no data needed).
    plan = "plan"
    prepare = "prepare"
    train = "train"
    evaluate = "evaluate"
    merge = "merge"
    predict = "predict"
    export = "export"


STAGES = tuple(s.value for s in Stage)
DatasetName = Choice("DatasetName", {v: v for v in ("demo", "mmlu", "cmmlu")})
PromptStyle = Choice("PromptStyle", {v: v for v in ("mmlu", "cmmlu", "contest")})
TokenizerKind = Choice("TokenizerKind", {v: v for v in ("tiktoken", "sentencepiece", "hf")})
OptimizerName = Choice("OptimizerName", {"adamw": "adamw"})
DeviceTarget = Choice("DeviceTarget", {v: v for v in ("CPU", "Ascend")})
ExecMode = Choice("ExecMode", {v: v for v in ("graph", "pynative")})
DType = Choice("DType", {v: v for v in ("float32", "float16", "bfloat16")})
LossScaleKind = Choice("LossScaleKind", {v: v for v in ("none", "dynamic")})
Direction = Choice("Direction", {v: v for v in ("maximize", "minimize")})
PredictFormat = Choice("PredictFormat", {v: v for v in ("jsonl", "npy")})
DuringMetric = Choice("DuringMetric", {v: v for v in ("during_mc_accuracy", "during_general_loss_delta")})


@dataclass
class DemoConfig:
    """The embedded demo world (finetune/data/demo.py)."""
    num_words: int = 160           # made-up words, a quarter of each kind
    test_fraction: float = 0.25    # share of words held out: asked about only in the test split
    dev_per_subject: int = 5       # k-shot examples per subject, taken from training words
    num_practice: int = 400        # arithmetic practice questions in the base corpus
    num_reading: int = 0           # passage + question + answer texts in the base corpus (see demo.yaml)
    squad_questions: int = 0       # SQuAD-format dev set (prepared squad.json; 0 = none)
    general_reading: int = 0       # reading examples (Alpaca) mixed into LoRA training when general.path is null
    seed: int = 0                  # which words are of which kind, and which are held out


@dataclass
class GeneralConfig:
    """General-ability examples mixed into the training split, so LoRA keeps what the base could
    do (rehearsal against forgetting; the SQuAD retention check measures it)."""
    path: Optional[str] = None     # Alpaca JSON list: instruction, input, output (output appended verbatim)
    limit: Optional[int] = None    # use at most this many (a sample drawn with `seed`)


@dataclass
class DatasetConfig:
    name: DatasetName = MISSING
    path: Optional[str] = MISSING  # folder with dev/ test/ (val/) CSVs; null for the demo
    style: PromptStyle = PromptStyle.mmlu   # prompt template
    # The CSV files' text encoding; null = UTF-8, or GBK/GB18030 when the bytes are clearly Chinese.
    encoding: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    dev_split: str = "dev"         # k-shot examples
    # When train_split == eval_split, this share of its questions (chosen by a hash of the
    # question id, so stable across runs) is held out of training and is all that is evaluated.
    holdout_fraction: float = 0.2
    subjects: Optional[list[str]] = None   # keep only these subjects (null = all)
    max_train_questions: Optional[int] = None  # cap after the split, for quick runs
    num_shots: int = 0             # the dataset's standard k-shot (MMLU, CMMLU: 5); eval.num_shots follows it
    general: GeneralConfig = field(default_factory=GeneralConfig)
    demo: Optional[DemoConfig] = None


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.tiktoken
    # tiktoken: a rank file; sentencepiece: tokenizer.model; hf: tokenizer.json, its folder or a .gguf.
    # null: the checkpoint's own (an HF folder's tokenizer.json or tokenizer.model, a GGUF file's
    # vocabulary), else the built-in demo encoding (tiktoken).
    path: Optional[str] = MISSING
    # A checkpoint whose tokenizer carries a chat template (an instruction-tuned model) sees exam
    # questions, SQuAD passages and predict inputs as a user turn, and learns the answer as the
    # assistant's reply. false: plain prompts whatever the checkpoint.
    chat_template: bool = True


@dataclass
class PretrainConfig:
    """Full-parameter training of a random-init base on the dataset's text corpus (demo only),
    cached under output_root/cache/base. epochs 0 = keep the random init."""
    epochs: int = 0
    learning_rate: float = 3e-3
    batch_size: int = 16


@dataclass
class ModelConfig:
    name: str = MISSING
    checkpoint: Optional[str] = MISSING  # MindSpore .ckpt of the base; null = random init (+ pretrain)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vocab_size: Optional[int] = None   # null = the tokenizer's
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    n_kv_heads: Optional[int] = None   # grouped-query attention; null = num_heads
    intermediate_size: int = MISSING
    seq_length: int = MISSING          # tokens per training example (prompt + answer)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_has_bias: bool = False         # InternLM: true (Llama + q/k/v/o biases)
    attn_proj_has_bias: bool = False
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # LoRA learning rate that works for this model; optimizer.learning_rate defaults to it.
    recommended_lr: float = 5e-5
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = ".*wq|.*wk|.*wv|.*wo"   # regex over cell names, mindformers.pet syntax


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    learning_rate: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0     # global-norm clipping; 0 = off


@dataclass
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    gradient_accumulation_steps: int = 1
    # Multi-node msrun keys: world size = data_parallel x model_parallel x pipeline_stage,
    # spread evenly over `nodes` machines; every node runs the same command with its node_rank.
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0           # 0: a free port (one node only); multi-node: the same port on every node
    join_timeout: int = 600        # seconds msrun waits for all workers to connect


@dataclass
class LossScaleConfig:
    kind: LossScaleKind = LossScaleKind.none   # dynamic: needed for float16 compute
    init_scale: float = 65536.0
    factor: float = 2.0
    window: int = 1000             # finite steps before the scale grows again


@dataclass
class HardwareConfig:
    device_target: DeviceTarget = DeviceTarget.CPU
    mode: ExecMode = ExecMode.graph
    compute_dtype: DType = DType.float32
    param_init_type: DType = DType.float32
    layernorm_compute_type: DType = DType.float32
    softmax_compute_type: DType = DType.float32
    rotary_dtype: DType = DType.float32
    fused_rms_norm: bool = False   # Ascend kernel; CPU: "kernel RmsNorm unregistered"
    use_rope_slice: bool = True    # CPU needs the slice rotation (BatchMatMul broadcast error otherwise)
    use_flash_attention: bool = False
    recompute: bool = False
    max_device_memory: Optional[str] = None
    # Packed positions one training micro-step holds at most (rows x model.seq_length): more rows
    # run as extra accumulated micro-steps (data/packing.micro_batches), so the step's memory does
    # not grow with the data. 2048 on CPU: one row at seq_length 2048 (the 128M model's step holds
    # ~17 GB there), 4 rows at 512. null: no limit.
    micro_batch_tokens: Optional[int] = 2048
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None      # any MLflow URI; null = sqlite store at output_root/mlflow.db
    experiment: str = "finetune"
    run_name: Optional[str] = None
    # An unreachable tracking server stops the job before training; false = log to the local
    # sqlite store instead (and say so).
    required: bool = True
    # MLflow system metrics (CPU, memory, disk, network; Ascend NPUs via npu-smi) for runs that train
    system_metrics: bool = True
    system_metrics_interval: float = 10.0   # seconds between samples
    # The merge stage logs the merged model as an MLflow (pyfunc) model; false: only its path is tagged
    log_model: bool = True
    register_model: Optional[str] = None   # a Model Registry name: the run's model becomes a new version


@dataclass
class SaveConfig:
    # Adapter checkpoints at evenly spaced optimizer steps, the last at the final step
    # (the contest asked for 5: e.g. epochs 2, 4, 6, 8, 10 of 10).
    num_checkpoints: int = 5


@dataclass
class EarlyStoppingConfig:
    """Stop when `metric` (measured every eval.every_n_steps) has not improved for `patience`
    evaluations in a row; the best evaluation's adapter is the one kept. null metric = off."""
    metric: Optional[DuringMetric] = None
    patience: int = 3


@dataclass
class TrainConfig:
    epochs: int = 6
    # Examples per device per micro-step. Packed: the rows of model.seq_length that hold that many
    # examples on average (data/packing.rows_per_step).
    batch_size: int = 16
    max_steps: Optional[int] = None  # optimizer steps cap, for quick runs
    shuffle: bool = True
    # Pack examples into rows of exactly model.seq_length positions (each attends to itself only):
    # one compiled training graph. false: one row per example, each batch cut to a length bucket
    # (a graph per bucket).
    packing: bool = True
    save: SaveConfig = field(default_factory=SaveConfig)
    resume: bool = False           # continue from the newest checkpoint in the run dir
    # A run dir holds one training run: training again where checkpoints exist is refused unless
    # this is true (the earlier run's checkpoints, adapter and train log are deleted first).
    overwrite: bool = False
    # Under dynamic loss scaling: this many non-finite (overflow) steps in a row stop the run as
    # diverged. Without loss scaling the first non-finite step does.
    max_nonfinite_steps: int = 8
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class MergeConfig:
    """W' = W + (alpha / rank) B A for each adapted layer -> a full checkpoint without adapter params."""
    all: bool = False              # merge every saved checkpoint, not only the final adapter


@dataclass
class ExportConfig:
    output: Optional[str] = None   # Hugging Face folder; null = <run dir>/hf


@dataclass
class SweepConfig:
    """How a multirun sweep picks its best child run (tagged on the parent MLflow run)."""
    objective: str = "mc_accuracy"
    direction: Direction = Direction.maximize
    require_retained: bool = True  # skip children whose SQuAD retention failed (where measured)
    # A Model Registry name: the best child's MLflow model (its merge stage's) becomes a new version
    # of it, and no other child's (jobs then leave tracking.register_model unset)
    register_best: Optional[str] = None


class SquadMetric(Choice):
    official = "official"          # the SQuAD v1.1 script's EM / F1
    mindformers = "mindformers"    # MindFormers' EmF1Metric (the 2024 contest's)
    both = "both"                  # squad_f1/squad_em official, plus *_official and *_mindformers keys


class SquadQuestions(Choice):
    all = "all"
    first_per_paragraph = "first_per_paragraph"   # the contest's set: 2,067 of dev-v1.1's 10,570


class SquadGold(Choice):
    all = "all"                    # best over every gold answer (the official script)
    first = "first"                # the first gold answer only (the contest)


class SquadPrompt(Choice):
    plain = "plain"                # "{context}\n\nQuestion: {question}\nAnswer:"
    mindformers = "mindformers"    # the contest's Alpaca-style template (finetune/evaluation/squad.py)


class Truncate(Choice):
    start = "start"                # a too-long prompt loses the start of its passage (keeps the question)
    end = "end"                    # ... loses its end (the contest: the head is kept)


@dataclass
class SquadConfig:
    """SQuAD v1.1 retained-ability check: passage + question -> short answer (greedy)."""
    path: Optional[str] = None     # official dev-v1.1.json layout; null = off
    limit: Optional[int] = 200     # first N questions (null = all 10,570 of the dev set)
    max_new_tokens: int = 16
    batch_size: int = 8
    metric: SquadMetric = SquadMetric.official
    questions: SquadQuestions = SquadQuestions.all
    gold: SquadGold = SquadGold.all
    prompt: SquadPrompt = SquadPrompt.plain
    truncate: Truncate = Truncate.start
    # Absolute bars besides the ratio to the base (retention_threshold): e.g. the seed's 53.88 / 31.59.
    # When either is set, `retained_absolute` says whether the fine-tuned model reaches both.
    min_f1: Optional[float] = None
    min_em: Optional[float] = None


@dataclass
class PredictConfig:
    input: Optional[str] = None    # Alpaca JSON list, or an MMLU/CMMLU CSV file; null = the eval split
    output: Optional[str] = None   # JSON Lines; null = <run dir>/predictions.jsonl
    format: PredictFormat = PredictFormat.jsonl   # npy: also results.npy (predicted option indices)
    max_new_tokens: int = 32       # for free-text (non multiple-choice) records
    batch_size: int = 16


class McMethod(Choice):
    logits = "logits"              # the answer letter's logit at the last prompt position (standard)
    generate = "generate"          # greedy answer, the letter read from it (the contest)


@dataclass
class McConfig:
    method: McMethod = McMethod.logits
    max_new_tokens: int = 8        # generate: "The right option is B." is 6 tokens in cl100k


@dataclass
class DuringConfig:
    """What eval.every_n_steps measures (finetune/training/during.py)."""
    limit: int = 64                # eval questions sampled once (seeded) for during_mc_accuracy
    general_limit: int = 32        # held-out passages (the SQuAD set's) for during_general_loss_delta


@dataclass
class EvalConfig:
    protocol: str = "standard"     # the eval group's name: standard | contest (conf/eval/)
    num_shots: int = 0             # k-shot examples from the dev split, same subject
    batch_size: int = 16
    limit: Optional[int] = None    # evaluate the first N questions only
    base: bool = True              # also evaluate the base model (mc_accuracy_base)
    adapter: Optional[str] = None  # adapter checkpoint; null = the run dir's adapter.ckpt
    squad: SquadConfig = field(default_factory=SquadConfig)
    mc: McConfig = field(default_factory=McConfig)
    # Also evaluate every checkpoint the train stage saved (run_dir/checkpoints) and report the best
    # by mc_accuracy among those that kept SQuAD ability (where measured).
    checkpoints: bool = False
    # A fine-tuned model counts as having kept its general ability when its SQuAD F1 and EM
    # are both at least this share of the base model's (the contest rule: 90%).
    retention_threshold: float = 0.9
    # Every N optimizer steps (and at the last): during_mc_accuracy and during_general_loss_delta as
    # step metrics (finetune/training/during.py); null = off
    every_n_steps: Optional[int] = None
    during: DuringConfig = field(default_factory=DuringConfig)


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    lora: LoraConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    parallel: ParallelConfig = MISSING
    hardware: HardwareConfig = MISSING
    tracking: TrackingConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = MISSING
    predict: PredictConfig = field(default_factory=PredictConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    stages: list[Stage] = field(default_factory=lambda: [Stage.prepare, Stage.train, Stage.evaluate, Stage.merge,
                                                          Stage.predict])
    seed: int = 0
    output_root: str = "outputs"   # data cache, base-model cache and the default MLflow store


GROUPS: dict[str, Any] = {
    "dataset": DatasetConfig, "model": ModelConfig, "lora": LoraConfig, "optimizer": OptimizerConfig,
    "parallel": ParallelConfig, "hardware": HardwareConfig, "tracking": TrackingConfig, "eval": EvalConfig,
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
