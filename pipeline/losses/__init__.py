"""Losses that are not part of a model: contrastive losses with their cross-rank gather."""
