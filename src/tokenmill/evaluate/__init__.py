"""Evaluation of trained models: bits per byte per domain, so recipes with different tokenizers compare."""
