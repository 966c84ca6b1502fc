"""Evaluation metrics: retrieval recall, attribute probes, reconstruction, prompt fidelity, and generation quality
(Frechet distance / FID, KID, CLIP score, the TF-Inception feature extractor)."""
