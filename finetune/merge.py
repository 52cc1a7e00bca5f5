"""Stage `merge`: fold a LoRA adapter into its base, W' = W + (alpha / rank) * B @ A, and save a
full checkpoint without adapter parameters.

alpha / rank is read from the adapter file (lora.save_adapter stores the rank and alpha it was
trained with), never given at merge time: MindFormers' own merge tool multiplies by 1 unless
--lora_scaling is passed by hand, a silent mistake this stage cannot make. A merged checkpoint
carries a marker, so merging an adapter into it a second time is refused.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from .lora import ADAPTER_TAG, META_ALPHA, META_RANK, adapter_path, tensor_text, text_tensor
from .model import ModelError, save_checkpoint

log = logging.getLogger("finetune.merge")

LORA_A, LORA_B = ".mindpet_delta_lora_a", ".mindpet_delta_lora_b"
MERGED_FILE = "merged.ckpt"
# Marker entries of a merged checkpoint (tensors, so model.load_checkpoint still loads it as a base:
# load_weights takes only the model's own parameter names).
MERGED_FROM, MERGED_SCALING = "lora_merged_from", "lora_merged_scaling"
MERGED_META = (MERGED_FROM, MERGED_SCALING)
MERGED_KEY_HF = "lora_merged"   # the same marker in an exported Hugging Face config.json


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


def read_checkpoint(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every entry of a MindSpore checkpoint as numpy, with a one-line error for a bad file."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what}: checkpoint {path} not found")
    try:
        raw = ms.load_checkpoint(str(path))
    except Exception as e:  # truncated / not a checkpoint
        raise ModelError(f"{what}: cannot read {path} as a MindSpore checkpoint ({str(e).splitlines()[0]})") from None
    return {k: v.asnumpy() for k, v in raw.items()}


def read_adapter(path: Path, what: str = "adapter") -> tuple[dict[str, np.ndarray], int, float]:
    """(adapter tensors, rank, alpha) from a checkpoint written by lora.save_adapter. The rank must
    agree with the tensors: A is [rank, in] for every layer."""
    tensors = read_checkpoint(path, what)
    if META_RANK not in tensors or META_ALPHA not in tensors:
        raise ModelError(f"{what}: {path} does not record the LoRA rank/alpha it was trained with "
                         f"(saved before adapters stored them); a guessed alpha/rank would merge it silently wrong")
    rank, alpha = int(tensors[META_RANK]), float(tensors[META_ALPHA])
    adapter = {k: v for k, v in tensors.items() if ADAPTER_TAG in k}
    if not adapter:
        raise ModelError(f"{what}: {path} holds no LoRA tensors (*{LORA_A} / *{LORA_B})")
    ranks = {v.shape[0] for k, v in adapter.items() if k.endswith(LORA_A)}
    if rank < 1 or ranks != {rank}:
        raise ModelError(f"{what}: {path} records lora_rank={rank}, but its lora_a tensors have rank "
                         f"{sorted(ranks)}; the file is inconsistent")
    return adapter, rank, alpha


def merged_marker(path: str | Path) -> str | None:
    """'<adapter file>, scaling s' when `path` is a checkpoint written by this stage (or an HF folder
    exported from one: config.json key `lora_merged`), else None."""
    import json

    import mindspore as ms

    from .hf import is_hf_dir

    path = Path(path)
    if is_hf_dir(path):
        try:
            return json.loads((path / "config.json").read_text()).get(MERGED_KEY_HF)
        except (ValueError, AttributeError):  # not JSON / not an object: model loading names the problem
            return None
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    try:
        raw = ms.load_checkpoint(str(path), choice_func=lambda name: name in MERGED_META)
    except Exception:  # unreadable: model loading reports it with its own message
        return None
    if MERGED_FROM not in raw:
        return None
    return f"{tensor_text(raw[MERGED_FROM])}, scaling {float(raw[MERGED_SCALING].asnumpy()):g}"


def refuse_merged_base(checkpoint: str | None) -> None:
    marker = merged_marker(checkpoint) if checkpoint else None
    if marker:
        raise ModelError(f"model.checkpoint {checkpoint} already has a LoRA adapter merged into it "
                         f"(from {marker}); merging again would add it twice")


def base_tensors(cfg, tok, prepared: Path, tracker) -> dict[str, np.ndarray]:
    """The base model's parameters as numpy: model.checkpoint (a .ckpt or HF folder), or the cached
    pretrained tiny base, exactly as train/evaluate build it."""
    from .train import load_base

    net = load_base(cfg, tok, prepared, tracker, batch_size=1)
    return {p.name: p.asnumpy() for p in net.get_parameters() if ADAPTER_TAG not in p.name}


def save_merged(tensors: dict[str, np.ndarray], path: Path, source: Path, scaling: float) -> None:
    import mindspore as ms

    marker = [(MERGED_FROM, text_tensor(Path(source).name)), (MERGED_SCALING, ms.Tensor(np.array(scaling, np.float64)))]
    save_checkpoint([(k, ms.Tensor(v)) for k, v in tensors.items()] + marker, path)


def merge(cfg, run_dir: Path, tok, prepared: Path, tracker) -> dict:
    """Merge the run's adapter (eval.adapter, else run_dir/adapter.ckpt) into the base ->
    run_dir/merged.ckpt; with merge.all also checkpoints/adapter-stepN.ckpt -> merged-stepN.ckpt."""
    run_dir = Path(run_dir)
    adapter = adapter_path(cfg, run_dir)
    if not adapter.is_file():
        raise ModelError(f"merge: adapter checkpoint {adapter} not found (run the train stage first, "
                         f"or point eval.adapter at one)")
    refuse_merged_base(cfg.model.checkpoint)
    jobs = [(adapter, run_dir / MERGED_FILE)]
    if cfg.merge.all:
        # adapter-step<N>.ckpt only: not a temp file (adapter-step<N>.tmp<pid>.ckpt) left by a crashed save
        steps = sorted(p for p in (run_dir / "checkpoints").glob("adapter-step*.ckpt")
                       if re.fullmatch(r"adapter-step\d+\.ckpt", p.name))
        if not steps:
            log.warning("merge.all: no adapter-step*.ckpt in %s; merging the final adapter only", run_dir / "checkpoints")
        jobs += [(p, p.with_name("merged-" + p.name[len("adapter-"):])) for p in steps]
    # Read every adapter first: a bad file fails before the (large) base is loaded.
    adapters = [read_adapter(src, "merge") for src, _ in jobs]
    base = base_tensors(cfg, tok, prepared, tracker)
    tags = {}
    for (src, dst), (tensors, rank, alpha) in zip(jobs, adapters):
        save_merged(merge_lora(base, tensors, alpha / rank), dst, src, alpha / rank)
        log.info("merged %s (rank %d, alpha %g: scaling %g) -> %s", src, rank, alpha, alpha / rank, dst)
        tags["merged" if dst.name == MERGED_FILE else f"merged.{dst.stem.removeprefix('merged-')}"] = str(dst)
    _, rank, alpha = adapters[0]   # the run's final adapter
    # Full checkpoints are large (14 GB for InternLM-7B): their paths are tagged, not uploaded.
    tracker.set_tags({**tags, "lora_scaling": alpha / rank})
    return {"merged": str(run_dir / MERGED_FILE), "merged_checkpoints": len(jobs) - 1, "lora_scaling": alpha / rank}
