"""The diffusion process, kept separate from the networks it trains (pure: no torch.distributed, no deepspeed).

- :mod:`pipeline.diffusion.schedules`: ``DiffusionConfig`` and the discrete VP ``NoiseSchedule`` (linear, cosine,
  shifted cosine), eps / x0 / v conversions, SNR and min-SNR loss weights, betas for diffusers schedulers.
- :mod:`pipeline.diffusion.objective`: the training loss, classifier-free-guidance dropout, noise-conditioning
  augmentation for super-resolution stages.
- :mod:`pipeline.diffusion.guidance`: classifier-free guidance (with guidance rescale) and Imagen's dynamic
  thresholding.
- :mod:`pipeline.diffusion.samplers`: ``SamplerConfig``, diffusers schedulers built from a schedule, their
  exportable configs, and the sampling loop that drives them.
- :mod:`pipeline.diffusion.cascade`: prompts -> base stage -> super-resolution stages -> images, built on the above.
"""
