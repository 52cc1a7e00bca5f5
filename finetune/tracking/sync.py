"""`python -m finetune.tracking sync <run dir>/mlflow_pending.json`: replay what a run could not
log into its MLflow run, once the store answers again."""
from __future__ import annotations

from pathlib import Path

from finetune.tracking.pending import read_pending
from finetune.tracking.tracker import Tracker, short_error


def sync(path: Path, uri: str | None = None) -> int:
    """Send a pending file to its run (at `uri`, default the one recorded); the file is removed once
    everything is sent. Returns the number of calls sent."""
    recorded_uri, run_id, calls = read_pending(path)
    tracker = Tracker.attached(uri or recorded_uri, run_id)
    for kind, payload in calls:
        tracker.send(kind, payload)     # raises if the store still does not answer: the file stays
    Path(path).unlink()
    return len(calls)


def main(argv=None) -> int:
    """python -m finetune.tracking sync <run dir>/mlflow_pending.json [--tracking-uri URI]"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m finetune.tracking",
                                description="send what a run could not log while its MLflow store was away")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="send a run dir's mlflow_pending.json to its MLflow run")
    s.add_argument("file", type=Path)
    s.add_argument("--tracking-uri", default=None, help="default: the URI recorded in the file")
    args = p.parse_args(argv)
    try:
        n = sync(args.file, args.tracking_uri)
    except Exception as e:
        print(f"finetune.tracking: error: {args.file}: {short_error(e)}", file=sys.stderr)
        return 1
    print(f"sent {n} MLflow calls from {args.file}")
    return 0
