"""Data: shard writing, the streaming reader with exact resume, transforms, precomputed conditioning."""
