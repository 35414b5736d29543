"""scmm-atlas: scMM, the mixture-of-experts multimodal VAE, at atlas scale."""

__version__ = "0.1.0"
