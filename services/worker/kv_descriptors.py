"""The order in which a KV read lists its block descriptors, so that NIXL can merge them.

vLLM's NIXL connector moves a request's KV as one descriptor per block and cache region (layer,
K or V), picked by index from descriptor lists prepared once per peer (`make_prepped_xfer`).
NIXL merges neighbouring descriptors that are contiguous on both sides into one, and on a host
each descriptor left costs a separate copy call (about 2 µs for UCX's cross-memory attach), so
a 1 MiB read of 16 KiB blocks moves at a fraction of memcpy speed unless it is merged.

NIXL only merges runs that ascend in the order given. vLLM lists the blocks in the request's
token order, and its block pool hands blocks out in the order they were freed, which is a
freed request's blocks *reversed* (vLLM frees the tail of a sequence first). Blocks of a
request are therefore often consecutive but descending, on the prefill engine and on the decode
engine alike, and NIXL moves them one by one. Listing the pairs by local descriptor index
instead moves the same bytes to the same places (a read is a set of (local, remote) pairs) and
turns every run that descends on both sides into one that ascends on both sides. Runs that
already ascend stay merged; nothing else changes.

No vLLM import here: unit-testable on its own (services/worker/nixl_connector.py uses it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

Indices = Sequence[int] | np.ndarray


def pair_order(local: Indices, remote: Indices) -> tuple[Any, Any]:
    """The same (local, remote) descriptor pairs, sorted by local index. Lists stay lists and
    arrays stay arrays of their dtype, as vLLM passes them."""
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local and {len(remote)} remote descriptors")
    if len(local) < 2:
        return local, remote
    loc = np.asarray(local)
    order = np.argsort(loc, kind="stable")
    if isinstance(local, np.ndarray):
        return local[order], np.asarray(remote)[order]
    rem = np.asarray(remote)
    return loc[order].tolist(), rem[order].tolist()


def ordered_prepped_xfer(make: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a NIXL agent's `make_prepped_xfer` so that every transfer lists its pairs by local
    index (same signature, same result)."""

    def make_prepped_xfer(operation: str, local_side: Any, local_indices: Indices,
                          remote_side: Any, remote_indices: Indices, *args: Any,
                          **kwargs: Any) -> Any:
        local, remote = pair_order(local_indices, remote_indices)
        return make(operation, local_side, local, remote_side, remote, *args, **kwargs)

    make_prepped_xfer.__wrapped__ = make  # type: ignore[attr-defined]
    return make_prepped_xfer
