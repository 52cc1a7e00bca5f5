"""LoRA fine-tuning of causal LLMs on multiple-choice exams, tracked in MLflow."""
import os

# MindSpore's generated protobuf modules only load with the pure-Python protobuf backend, and it
# must be chosen before anything (MLflow, Hydra) imports protobuf: mindspore picks "python" on
# import, but by then protobuf may already be loaded with the C backend and importing fails.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
# MindSpore's C++ log level: 3 = errors only (its warnings are about Ascend-only features).
os.environ.setdefault("GLOG_v", "3")
