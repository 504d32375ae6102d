"""jaxsam: JAX/Flax image-classifier training with Sharpness-Aware Minimization."""

__version__ = "0.1.0"
