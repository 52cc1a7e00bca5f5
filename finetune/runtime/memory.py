"""Peak memory per stage: the process's resident-set high-water mark (VmHWM) at the end of each
stage, so `<stage>_peak_rss_gb` is the job's peak so far and a stage that raised it shows where
memory went. Not reset between stages on purpose: resetting it (/proc/self/clear_refs) also
resets what getrusage / `/usr/bin/time -v` / a parent's wait4 report, which then under-state the
job's peak (measured: 7.7 GB reported for a job that had reached 11.5 GB). Elsewhere than Linux:
not measured (None)."""
from __future__ import annotations

from pathlib import Path


def peak_rss_gb() -> float | None:
    """The process's peak resident set so far (GB, 1e9 bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 3)   # reported in kB
    except OSError:
        pass
    return None
