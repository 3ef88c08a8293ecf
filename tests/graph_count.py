"""A torch.compile backend that counts the graphs dynamo hands it (and runs them uncompiled), for tests that
check how often blocks are compiled."""

from __future__ import annotations


class GraphCounter:
    """Pass as ``backend=``; ``count`` is the number of graphs compiled so far."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        return gm.forward
