"""Offline precompute (``python -m pipeline shards precompute``): frozen networks (T5, CLIP, the autoencoder) run
once over source shards and store per-sample arrays beside them, so training reads arrays instead of running the
encoders every step. Above models/ and stages/ (it loads their networks), below the CLI; what it writes is read by
the data layer (pipeline/data/precomputed_index.py, aligned.py).

- :mod:`pipeline.precompute.encoders`: the registry of named encoders (``t5:``, ``clip-text:``, ``clip-image:``,
  ``latents:``), the only dispatch.
- :mod:`pipeline.precompute.run`: the job (parts, resume, finalize) and the per-shard encoding.
"""
