"""System metrics: `npu-smi info` parsed from a sample in its documented layout (tests/data; no
Ascend machine here), and the NPU monitor fed by that output through MLflow's monitor interface.
The CPU/memory side is MLflow's own monitor, checked on the pipeline run (tests/test_pipeline.py)."""
import os
from pathlib import Path

from finetune.tracking.system_metrics import npu_monitor_class, parse_npu_smi

SAMPLE = Path(__file__).parent / "data" / "npu-smi-info.txt"


def test_parse_npu_smi_sample():
    npus = parse_npu_smi(SAMPLE.read_text())
    assert sorted(npus) == [0, 1, 2, 3]                   # the process table below is not an NPU
    assert npus[1] == {"power_watts": 201.4, "temperature_celsius": 47.0, "aicore_utilization_percentage": 87.0,
                       "hbm_usage_megabytes": 58211.0, "hbm_total_megabytes": 65536.0,
                       "hbm_utilization_percentage": 88.82}
    assert "power_watts" not in npus[2] and "aicore_utilization_percentage" not in npus[2]   # NA: not a number
    assert npus[3]["memory_usage_megabytes"] == 15011.0 and "hbm_utilization_percentage" not in npus[3]
    assert parse_npu_smi("") == {} and parse_npu_smi("npu-smi: command failed\n") == {}


def test_npu_monitor_reads_npu_smi_through_mlflows_interface(tmp_path, monkeypatch):
    tool = tmp_path / "npu-smi"
    tool.write_text(f"#!/bin/sh\ncat {SAMPLE}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monitor = npu_monitor_class()()
    monitor.collect_metrics()
    monitor.collect_metrics()
    agg = monitor.aggregate_metrics()
    assert agg["npu_1_aicore_utilization_percentage"] == 87.0 and agg["npu_0_hbm_usage_megabytes"] == 3395.0
    assert len(agg) == 6 + 6 + 4 + 7
