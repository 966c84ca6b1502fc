"""The diffusion process, kept separate from the networks it trains (pure: no networks, no torch.distributed, no
deepspeed; networks enter only as `predict(x_t, t)` callables).

- :mod:`pipeline.diffusion.schedules`: ``DiffusionConfig`` and the discrete VP ``NoiseSchedule`` (linear,
  scaled_linear, cosine, shifted cosine, zero-terminal-SNR rescale), eps / x0 / v conversions, SNR and min-SNR loss
  weights, betas for diffusers schedulers.
- :mod:`pipeline.diffusion.flow`: rectified flow (``objective: flow``): ``FlowConfig`` (timestep density, SD3/Flux
  shift) and ``FlowSchedule`` (path, velocity target, loss weights), addressed by timestep t = s * T like diffusers.
- :mod:`pipeline.diffusion.tensors`: small helpers both processes share (range check, coefficient broadcast).
- :mod:`pipeline.diffusion.objective`: the training loss, classifier-free-guidance dropout, noise-conditioning
  augmentation for super-resolution stages.
- :mod:`pipeline.diffusion.guidance`: classifier-free guidance (with guidance rescale) and Imagen's dynamic
  thresholding.
- :mod:`pipeline.diffusion.samplers`: ``SamplerConfig``, diffusers schedulers built from a schedule (one
  ``SAMPLER_KINDS`` entry per sampler), their exportable configs, and the sampling loop that drives them.

The cascade of networks that uses them lives in :mod:`pipeline.sampling`.
"""
