"""The LoRA adapter file, in one place: its tensor names, what it records about the LoRA it was
trained with (rank, alpha, target regex), writing it, reading it, loading it into a model, and
merging it into base weights (W' = W + alpha/rank * B @ A). Also the marker of a merged checkpoint.

The adapter file is the authority on its LoRA shape: evaluate, merge, predict and export build
LoRA from what it records (`lora_settings`), never from whatever `lora.*` says at the time; a
`lora.*` value given on the command line that disagrees with the file is an error naming both.
MindFormers' own merge tool multiplies by 1 unless --lora_scaling is passed by hand; taking alpha
and rank from the file makes that mistake impossible here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune import rundir
from finetune.errors import ModelError
from finetune.model.checkpoint import read_checkpoint, save_checkpoint

ADAPTER_TAG = "mindpet_delta_lora"     # mindformers.pet's LoRA parameters: <layer>.mindpet_delta_lora_{a,b}
LORA_A, LORA_B = f".{ADAPTER_TAG}_a", f".{ADAPTER_TAG}_b"

# The LoRA settings an adapter was trained with, stored inside its checkpoint as tensors (text as
# UTF-8 bytes): model.save_checkpoint takes tensors only, and a merged checkpoint must still load as
# a base (load_weights takes only the model's own parameter names). None contains ADAPTER_TAG.
META_RANK, META_ALPHA, META_TARGETS = "lora_rank", "lora_alpha", "lora_target_modules"
ADAPTER_META = (META_RANK, META_ALPHA, META_TARGETS)
# Marker entries of a merged checkpoint, so that merging an adapter into it again is refused.
MERGED_FROM, MERGED_SCALING = "lora_merged_from", "lora_merged_scaling"
MERGED_META = (MERGED_FROM, MERGED_SCALING)
MERGED_KEY_HF = "lora_merged"          # the same marker in an exported Hugging Face config.json


def adapter_path(cfg, run_dir) -> Path:
    """eval.adapter if set, else the adapter the train stage writes into the run dir."""
    return Path(cfg.eval.adapter) if cfg.eval.adapter else Path(run_dir) / rundir.ADAPTER


def text_tensor(text: str):
    import mindspore as ms

    return ms.Tensor(np.frombuffer(text.encode("utf-8"), np.uint8).copy())


def tensor_text(value) -> str:
    return np.asarray(value.asnumpy() if hasattr(value, "asnumpy") else value, np.uint8).tobytes().decode("utf-8")


def adapter_params(net) -> list:
    """[(name, Parameter)] of the LoRA weights in a network."""
    return [(p.name, p) for p in net.get_parameters() if ADAPTER_TAG in p.name]


def net_lora_settings(net) -> dict:
    """rank / alpha / target_modules of the LoRA that mindformers.pet applied to `net` (the values
    its LoRADense layers compute with: scaling = alpha / rank)."""
    pet = getattr(getattr(net, "config", None), "pet_config", None)
    if pet is None or not hasattr(pet, "lora_rank"):
        raise ModelError("save_adapter: the network has no LoRA config (was apply_lora called on it?)")
    return {"rank": int(pet.lora_rank), "alpha": float(pet.lora_alpha), "target_modules": str(pet.target_modules)}


def save_adapter(net, path) -> None:
    """The adapter tensors plus the rank, alpha and target regex the net's LoRA layers use."""
    import mindspore as ms

    lora = net_lora_settings(net)
    meta = [(META_RANK, ms.Tensor(np.array(lora["rank"], np.int32))),
            (META_ALPHA, ms.Tensor(np.array(lora["alpha"], np.float64))),   # float64: alpha exactly as given
            (META_TARGETS, text_tensor(lora["target_modules"]))]
    save_checkpoint(adapter_params(net) + meta, path)


def read_adapter(path, what: str = "adapter") -> tuple[dict[str, np.ndarray], dict]:
    """(adapter tensors, {rank, alpha, target_modules}) from a file written by save_adapter. The
    recorded rank must agree with the tensors (A is [rank, in] for every layer)."""
    path = Path(path)
    tensors = read_checkpoint(path, what)
    if META_RANK not in tensors or META_ALPHA not in tensors:
        raise ModelError(f"{what}: {path} does not record the LoRA rank/alpha it was trained with "
                         f"(not an adapter written by this tool?); a guessed alpha/rank would use it silently wrong")
    meta = {"rank": int(tensors[META_RANK]), "alpha": float(tensors[META_ALPHA]),
            "target_modules": tensor_text(tensors[META_TARGETS]) if META_TARGETS in tensors else None}
    adapter = {k: v for k, v in tensors.items() if ADAPTER_TAG in k}
    if not adapter:
        raise ModelError(f"{what}: {path} holds no LoRA tensors (*{LORA_A} / *{LORA_B})")
    ranks = {v.shape[0] for k, v in adapter.items() if k.endswith(LORA_A)}
    if meta["rank"] < 1 or ranks != {meta["rank"]}:
        raise ModelError(f"{what}: {path} records lora_rank={meta['rank']}, but its lora_a tensors have rank "
                         f"{sorted(ranks)}; the file is inconsistent")
    return adapter, meta


def lora_differences(meta: dict, lora_cfg) -> dict[str, tuple]:
    """{key: (configured value, the file's value)} for each of rank, alpha, target_modules where the
    lora group and an adapter file's record disagree (a file that records no targets agrees)."""
    mine = {"rank": int(lora_cfg.rank), "alpha": float(lora_cfg.alpha), "target_modules": str(lora_cfg.target_modules)}
    return {k: (mine[k], meta[k]) for k in mine if meta[k] is not None and meta[k] != mine[k]}


def lora_settings(meta: dict, lora_cfg, given: frozenset[str] = frozenset(), path="the adapter") -> dict:
    """The LoRA to build for an adapter: rank, alpha and target_modules from the file; dropout from
    lora_cfg (it does not change the weights). A `lora.<key>` given on the command line (`given`)
    that disagrees with the file is an error naming both values; an unchanged default is not."""
    for key, (mine, recorded) in lora_differences(meta, lora_cfg).items():
        if f"lora.{key}" in given:
            raise ModelError(f"lora.{key}={mine} was given, but {path} was trained with lora.{key}={recorded}; "
                             f"drop the override (the adapter's own value is used) or evaluate another adapter")
    return {"rank": meta["rank"], "alpha": meta["alpha"],
            "target_modules": meta["target_modules"] or lora_cfg.target_modules, "dropout": float(lora_cfg.dropout)}


def check_run_adapter(cfg, run_dir, given: frozenset[str]) -> None:
    """At start-up: the adapter that evaluate / merge / predict / export will use (when it exists and
    this run does not train a new one) must be readable and agree with any `lora.*` override."""
    if "train" in cfg.stages or not {"evaluate", "merge", "predict", "export"} & set(cfg.stages):
        return
    path = adapter_path(cfg, run_dir)
    if path.is_file():
        lora_settings(read_adapter(path, "eval.adapter")[1], cfg.lora, given, path)


def load_adapter(net, path, what: str = "eval.adapter") -> None:
    """Copy an adapter's tensors into a LoRA-wrapped net; names and shapes must match exactly."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what}: adapter checkpoint {path} not found")
    params, _ = read_adapter(path, what)
    expected = dict(adapter_params(net))
    if set(params) != set(expected):
        diff = sorted(set(params) ^ set(expected))
        raise ModelError(f"{what}: {path} does not fit this model ({len(diff)} name(s) differ, e.g. {diff[:3]}); "
                         f"was it trained with other model settings?")
    for name, p in expected.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise ModelError(f"{what}: {path}: {name} has shape {tuple(params[name].shape)}, expected {tuple(p.shape)}")
    ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v, expected[k].dtype), name=k) for k, v in params.items()},
                           strict_load=True)


def merge_lora(base: dict[str, np.ndarray], adapter: dict[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    """Base tensors with W' = W + scaling * B @ A for every adapted layer (base names only).

    mindpet's LoRADense keeps A as [rank, in] and B as [out, rank] and computes
    x @ A.T @ B.T * scaling, so the weight delta is B @ A: [out, in], the Linear weight's layout
    (MindFormers' Linear uses transpose_b, like torch). Summed in float64, cast back to W's dtype.
    Unadapted tensors are the same arrays as in `base` (no copy of a 7B model)."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in adapter.items():
        for suffix, key in ((LORA_A, "a"), (LORA_B, "b")):
            if name.endswith(suffix):
                pairs.setdefault(name[:-len(suffix)], {})[key] = value
                break
        else:
            raise ModelError(f"adapter: unexpected tensor {name!r} (expected *{LORA_A} and *{LORA_B} pairs)")
    merged = dict(base)
    for layer, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            have, lack = ("lora_a", "lora_b") if "a" in ab else ("lora_b", "lora_a")
            raise ModelError(f"adapter: {layer} has {have} but no {lack}")
        weight = f"{layer}.weight"
        if weight not in base:
            raise ModelError(f"adapter: {layer} is adapted, but the base model has no {weight}")
        w, a, b = base[weight], ab["a"], ab["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != w.shape:
            raise ModelError(f"adapter: {layer}: lora_b {tuple(b.shape)} @ lora_a {tuple(a.shape)} does not give the "
                             f"weight's shape {tuple(w.shape)} [out, in]; expected lora_a [rank, {w.shape[1]}] and "
                             f"lora_b [{w.shape[0]}, rank]")
        delta = b.astype(np.float64) @ a.astype(np.float64)
        merged[weight] = (w.astype(np.float64) + scaling * delta).astype(w.dtype)
    return merged


def base_tensors(checkpoint) -> dict[str, np.ndarray]:
    """A base model's parameters as numpy, straight from its checkpoint file (no adapter or
    merge-marker entries)."""
    return {k: v for k, v in read_checkpoint(checkpoint, "base checkpoint").items()
            if ADAPTER_TAG not in k and k not in MERGED_META}


def save_merged(tensors: dict[str, np.ndarray], path: Path, source: Path, scaling: float) -> None:
    import mindspore as ms

    marker = [(MERGED_FROM, text_tensor(Path(source).name)), (MERGED_SCALING, ms.Tensor(np.array(scaling, np.float64)))]
    save_checkpoint([(k, ms.Tensor(v)) for k, v in tensors.items()] + marker, path)


def merged_marker(path) -> str | None:
    """'<adapter file>, scaling s' when `path` is a checkpoint written by the merge stage (or an HF
    folder exported from one: config.json key `lora_merged`), else None."""
    import json

    from finetune.config.hf_config import is_hf_dir

    path = Path(path)
    if is_hf_dir(path):
        try:
            return json.loads((path / "config.json").read_text()).get(MERGED_KEY_HF)
        except (ValueError, AttributeError):  # not JSON / not an object: model loading names the problem
            return None
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    try:
        raw = read_checkpoint(path, "checkpoint", names=MERGED_META)
    except ModelError:  # unreadable: model loading reports it with its own message
        return None
    if MERGED_FROM not in raw:
        return None
    return f"{tensor_text(raw[MERGED_FROM])}, scaling {float(raw[MERGED_SCALING]):g}"


def refuse_merged_base(checkpoint) -> None:
    marker = merged_marker(checkpoint) if checkpoint else None
    if marker:
        raise ModelError(f"model.checkpoint {checkpoint} already has a LoRA adapter merged into it "
                         f"(from {marker}); merging again would add it twice")
