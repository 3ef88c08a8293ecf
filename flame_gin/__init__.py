"""flame_gin: a config-first (absl + gin) trainer for Flash Linear Attention language models."""

__version__ = "0.1.0"
