"""Runs many distributed cases inside one process group (one spawn per world size keeps the suite fast).

Each rank records, per case, "ok" or the traceback, in `<out>.<rank>.json`.
"""

from __future__ import annotations

import importlib
import json
import traceback

import torch.distributed as dist


def run_cases(rank, world, cases, out):
    results = {}
    for name, (target, args, kwargs) in cases.items():
        module, _, func = target.partition(":")
        try:
            getattr(importlib.import_module(module), func)(rank, world, *args, **kwargs)
            results[name] = "ok"
        except Exception:  # recorded per case; the test for that case fails with this text
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f)
