"""Trainer callbacks: weight/bias/gradient histograms, diagnostics that give advice, a clean stop on preemption."""

from hf_wb.callbacks.diagnostics import DiagnosticsConfig, Finding, WeightDiagnosticsCallback
from hf_wb.callbacks.histograms import WeightHistogramCallback
from hf_wb.callbacks.preemption import EXIT_PREEMPTED, PreemptionCallback, TrainingPreempted

__all__ = [
    "DiagnosticsConfig",
    "EXIT_PREEMPTED",
    "Finding",
    "PreemptionCallback",
    "TrainingPreempted",
    "WeightDiagnosticsCallback",
    "WeightHistogramCallback",
]
