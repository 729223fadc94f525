"""Evaluation: generation, metrics and their significance."""
