"""The one Trainer loop, the DeepSpeed backend, checkpointing, EMA, logging and metrics."""
