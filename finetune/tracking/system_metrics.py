"""System metrics of a training run in MLflow (`system/...` metrics, the run page's "System
metrics" tab): MLflow's own monitor (CPU, memory, disk, network; NVIDIA GPUs when present), plus
Ascend NPUs read from `npu-smi info` when that command exists. On by default for runs that train;
`tracking.system_metrics=false` turns it off, `tracking.system_metrics_interval` sets the seconds
between samples.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess

log = logging.getLogger(__name__)

# `npu-smi info` prints two table rows per NPU:
#   | 0     910B3               | OK            | 93.8        41                0    / 0             |
#   | 0                         | 0000:C1:00.0  | 0           0    / 0          3395 / 65536         |
# NPU id, name | health | power (W), temperature (C), huge pages used / total
# chip id      | bus id | AI Core use (%), memory used / total (MB), HBM used / total (MB)
_FIRST = re.compile(r"^\|\s*(\d+)\s+(\S+)\s*\|\s*(\S+)\s*\|\s*([\d.]+|NA)\s+([\d.]+|NA)\s+(\d+)\s*/\s*(\d+)\s*\|\s*$")
_SECOND = re.compile(r"^\|\s*(\d+)\s*\|\s*([0-9A-Fa-f:.]+)\s*\|\s*([\d.]+|NA)\s+(\d+)\s*/\s*(\d+)\s+(\d+)\s*/\s*(\d+)\s*\|\s*$")


def _number(text: str) -> float | None:
    return None if text == "NA" else float(text)


def parse_npu_smi(text: str) -> dict[int, dict[str, float]]:
    """{npu id: {metric: value}} from `npu-smi info`: power_watts, temperature_celsius,
    aicore_utilization_percentage, hbm_usage_megabytes, hbm_total_megabytes,
    hbm_utilization_percentage (memory_* for the DDR memory where the card reports it)."""
    out: dict[int, dict[str, float]] = {}
    npu = None
    for line in text.splitlines():
        m = _FIRST.match(line.strip())
        if m:
            npu = int(m.group(1))
            out[npu] = {k: v for k, v in (("power_watts", _number(m.group(4))),
                                          ("temperature_celsius", _number(m.group(5)))) if v is not None}
            continue
        m = _SECOND.match(line.strip())
        if m and npu is not None and npu in out and "hbm_total_megabytes" not in out[npu]:
            aicore, mem, mem_total, hbm, hbm_total = (_number(m.group(3)), float(m.group(4)), float(m.group(5)),
                                                       float(m.group(6)), float(m.group(7)))
            row = out[npu]
            if aicore is not None:
                row["aicore_utilization_percentage"] = aicore
            if mem_total:
                row.update(memory_usage_megabytes=mem, memory_total_megabytes=mem_total)
            row.update(hbm_usage_megabytes=hbm, hbm_total_megabytes=hbm_total)
            if hbm_total:
                row["hbm_utilization_percentage"] = round(100 * hbm / hbm_total, 2)
            npu = None
    return out


def npu_monitor_class():
    """A monitor for MLflow's SystemMetricsMonitor (its BaseMetricsMonitor interface): one
    `npu-smi info` per sample, averaged per logged point; metric names npu_<id>_<metric>."""
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

    class NpuMonitor(BaseMetricsMonitor):
        def collect_metrics(self):
            try:
                text = subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for npu, values in parse_npu_smi(text).items():
                for key, value in values.items():
                    self._metrics[f"npu_{npu}_{key}"].append(value)

        def aggregate_metrics(self):
            return {k: round(sum(v) / len(v), 2) for k, v in self._metrics.items() if v}

    return NpuMonitor


def start_system_metrics(tracker, interval: float):
    """MLflow's system metrics monitor on the tracker's run (+ NPUs if `npu-smi` exists), started;
    None when there is no MLflow run. Stop it with stop_system_metrics before the run ends."""
    if not tracker.client or not tracker.run_id:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)   # its start/stop lines: not ours to show
    monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval, samples_before_logging=1,
                                   resume_logging=tracker.resumed, tracking_uri=tracker.uri)
    if shutil.which("npu-smi"):
        monitor.monitors.append(npu_monitor_class()())
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception as e:   # never let a metrics thread fail the run
            log.warning("system metrics: %s", e)
