"""Parallelism for FLA language models: FSDP2/HSDP/DDP, tensor, pipeline and context parallel."""

from flame_gin.parallel.parallelize import parallelize

__all__ = ["parallelize"]
