"""Continuing a loader with another number of streams (ranks times workers) from every old stream's state.

Each source's cursors are re-split (``order.reshard``: no document read twice or skipped); blocks an old stream
had begun (``readers.BlockReader``) are handed, with the rows already done, to the new streams round robin; a
replayed stream's shuffle state is the leading old stream's (every stream replays the same one); the tokens old
streams had queued go to the new streams rather than being dropped; each new stream draws its mixture from an
RNG seeded by its id, the number of streams and the generation (the count of such re-splits).
"""

from __future__ import annotations

import copy

import numpy as np

from flame_gin.data import order


def streams(old: list, *, plan, num_streams: int, generation: int) -> list[dict]:
    """The states of the ``num_streams`` new streams, from the states of every old stream (None: never ran)."""
    s_old, s_new, n_src = len(old), num_streams, len(plan.sources)
    old_readers = [
        st["readers"] if st else [plan.fresh_reader_state(source=s, stream=g, num_streams=s_old) for s in range(n_src)]
        for g, st in enumerate(old)
    ]
    new = [
        {
            "readers": [],
            "packer": {"docs": [], "tokens_per_source": [0] * n_src},
            "active": [True] * n_src,
            "tokens_per_doc": float(plan.rows * plan.seq_len + 1),
        }
        for _ in range(s_new)
    ]
    for s in range(n_src):
        cursors = [rs[s]["cursor"] for rs in old_readers]
        lead = old_readers[min(range(s_old), key=lambda g: order.peek(cursors[g]))][s]
        # blocks begun by old streams are taken (their cursors moved past them): their rest is handed out
        partial = sorted(x for rs in old_readers for x in rs[s].get("partial", []))
        for j, cursor in enumerate(order.reshard(cursors, num_streams=s_new)):
            st = {"cursor": cursor}
            if "shuffle" in lead:
                st["shuffle"] = copy.deepcopy(lead["shuffle"])
            if "partial" in lead:
                st["partial"] = [list(x) for x in partial[j::s_new]]
            new[j]["readers"].append(st)
    for g, st in enumerate(old):
        if st is None:
            continue
        packer = new[g % s_new]["packer"]
        packer["docs"] += st["packer"]["docs"]
        packer["tokens_per_source"] = [
            a + b for a, b in zip(packer["tokens_per_source"], st["packer"]["tokens_per_source"])
        ]
    for j, st in enumerate(new):
        st["rng"] = np.random.Generator(np.random.PCG64([plan.seed, j, s_new, generation])).bit_generator.state
    return new
