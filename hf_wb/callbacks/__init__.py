"""Trainer callbacks: weight/bias/gradient histograms and diagnostics that give advice."""

from hf_wb.callbacks.diagnostics import DiagnosticsConfig, Finding, WeightDiagnosticsCallback
from hf_wb.callbacks.histograms import WeightHistogramCallback

__all__ = ["DiagnosticsConfig", "Finding", "WeightDiagnosticsCallback", "WeightHistogramCallback"]
