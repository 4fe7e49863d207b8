"""Shared MoE / sparse-attention backbone and service helpers."""
__version__ = "0.1.0"
