"""Data pipeline: sources, mixtures, online tokenization, packing/varlen and exactly resumable loaders.

Public entry points: ``build_loader`` (one rank's loader), ``source`` (describe a text source),
``embedded.corpus_dir`` / ``embedded.tokenizer_path`` (the no-network default corpus and tokenizer).
"""

from flame_gin.data import embedded
from flame_gin.data.loader import Loader, build_loader
from flame_gin.data.sources import Source, source

__all__ = ["Loader", "Source", "build_loader", "embedded", "source"]
