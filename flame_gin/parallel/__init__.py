"""Parallelism for FLA language models: FSDP2/HSDP/DDP, tensor, pipeline and context parallel."""

from flame_gin.parallel.loss import global_valid_tokens, normalized_loss, token_loss_sum
from flame_gin.parallel.parallelize import parallelize

__all__ = ["parallelize", "global_valid_tokens", "normalized_loss", "token_loss_sum"]
