"""adapprox: Adam with a randomized low-rank second moment (Adapprox), and tools for AdamW checkpoints."""

__version__ = "0.1.0"
