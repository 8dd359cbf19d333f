"""lamda-repro: reproduction suite for LaMDA / LaMDA++ and Relaxed Recursive Transformers."""

__version__ = "0.1.0"
