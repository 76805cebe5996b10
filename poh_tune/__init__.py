"""poh_tune: Ray Tune hyperparameter search for the Pointer-over-Heads transformer."""

__version__ = "0.1.0"
