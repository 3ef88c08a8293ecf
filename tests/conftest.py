"""Shared test set-up: quiet FLA's CPU warning, keep caches inside the test session's temp area."""

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
