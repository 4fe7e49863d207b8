"""Forecasting core: data protocols, models, metrics and calibrated intervals (pipelines + service)."""
