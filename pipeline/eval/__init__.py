"""Evaluation metrics (retrieval recall, later: generation quality checks)."""
