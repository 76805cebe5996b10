"""poh_tune: Ray Tune hyperparameter search for the Pointer-over-Heads transformer."""

__version__ = "0.1.0"

# Loaded on first use: `import poh_tune` (and the launcher's argument checks) stays free of
# torch and Ray.
_LAZY = {"load_trial": "poh_tune.checkpoints", "LoadedTrial": "poh_tune.checkpoints",
         "restore_trainable": "poh_tune.tuner"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'poh_tune' has no attribute {name!r}")
