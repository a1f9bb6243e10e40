"""S4ECA-JAX: referring remote sensing image segmentation with frozen encoders and
language-guided scale and spatial selection adapters, in JAX/Flax."""

__version__ = "0.1.0"
