"""Peak memory per stage: the process's resident-set high-water mark (VmHWM), reset before each
stage through /proc/self/clear_refs ("5" resets the peak to the current RSS; Linux 4.0+), so
each stage reports its own peak rather than the job's. Elsewhere: not measured (None)."""
from __future__ import annotations

from pathlib import Path


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float | None:
    """The peak resident set (GB, 1e9 bytes) since the last reset_peak, or the process start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 3)   # reported in kB
    except OSError:
        pass
    return None
