"""Frozen text encoders: T5 encoder + tokenizer loading (real checkpoints by path; tiny random ones for tests)."""
