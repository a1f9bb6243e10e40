"""Data: manual-download layouts (layouts.py), the synthetic scene generator
(synthetic.py) and the grain input pipeline (pipeline.py)."""
