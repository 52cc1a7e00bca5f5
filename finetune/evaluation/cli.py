"""`python -m finetune.evaluation squad DATASET.json PREDICTIONS.json`: the SQuAD v1.1 scores of a predictions
file, by the official script's rules or MindFormers' (evaluation/metrics.py), outside any run."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from finetune.data.squad import read_json, squad_records
from finetune.evaluation.metrics import SQUAD_METRICS, score_squad_records

log = logging.getLogger(__name__)


SQUAD_USAGE = ("usage: python -m finetune.evaluation squad [--metric official|mindformers|both] [--gold all|first] "
               "DATASET.json PREDICTIONS.json")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m finetune.evaluation squad [--metric M] [--gold G] DATASET.json PREDICTIONS.json` ->
    JSON scores on stdout ({"exact_match", "f1"}; with --metric both, one such object per metric).
    Exit 2 on bad usage, 1 on an unreadable or malformed file."""
    options = {"--metric": "official", "--gold": "all"}
    choices = {"--metric": (*SQUAD_METRICS, "both"), "--gold": ("all", "first")}
    words, positional = list(sys.argv[1:] if argv is None else argv), []
    while words:
        word = words.pop(0)
        name, _, value = word.partition("=")
        if name in options:
            value = value or (words.pop(0) if words else "")
            if value not in choices[name]:
                positional = []   # bad usage
                break
            options[name] = value
        else:
            positional.append(word)
    if len(positional) != 3 or positional[0] != "squad":
        print(SQUAD_USAGE, file=sys.stderr)
        return 2
    args = SimpleNamespace(dataset=positional[1], predictions=positional[2], metric=options["--metric"],
                           gold=options["--gold"])
    try:
        dataset = read_json(args.dataset)
        version = dataset.get("version") if isinstance(dataset, dict) else None
        if version != "1.1":
            log.warning("%s: expected a SQuAD v1.1 file, got version %r", args.dataset, version)
        predictions = read_json(args.predictions)
        if not isinstance(predictions, dict):
            raise ValueError(f"{args.predictions}: expected a JSON object of question id -> answer text")
        records = list(squad_records(dataset, args.dataset))
        if args.metric == "both":
            scores = {m: score_squad_records(records, predictions, m, args.gold) for m in SQUAD_METRICS}
        else:
            scores = score_squad_records(records, predictions, args.metric, args.gold)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
