"""Flax modules: frozen encoders (vit, text), their Hugging Face weight loading
(hf_weights), and the S4ECA adapters and decoder."""
