"""Inference: prompts -> images through trained networks, above models/ and diffusion/ and below the stages that
train them (which call it for their sample grids and evaluation).

- :mod:`pipeline.sampling.cascade`: ``SamplingConfig`` and the cascade sampler: one :class:`CascadeLevel` per
  U-Net of the cascade (base, then super-resolution levels), sampled in order with guidance and thresholding.
- :mod:`pipeline.sampling.prior`: the DALL-E 2 prior's sampler (text -> CLIP image embedding, K candidates).
- :mod:`pipeline.sampling.text2image`: ``Text2Image``, an exported bundle loaded and ready to sample (the Python
  API and ``python -m pipeline sample``).
"""
