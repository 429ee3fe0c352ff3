"""The gateway's requests in flight per worker, and which workers' counts moved.

:class:`InFlightCounts` is the ``Counter`` of worker id -> requests this gateway has in flight
there (services/gateway/worker_directory.py ``WorkerDirectory.in_flight``) that also tells each
watcher (:meth:`watch`) which workers' counts changed since the watcher last looked: the route
stage's shortlist (services/gateway/route_shortlist.py) re-sets only those workers' loads
before a decision, not every worker with a request in flight.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

__all__ = ["InFlightCounts", "MovedWorkers"]


class MovedWorkers(set[str]):
    """Worker ids whose in-flight count changed since the watcher cleared this set."""

    all_moved = False
    """True after a change not made key by key (a clear, a bulk update): every worker may
    have moved; the watcher resets it when it has looked at every worker."""


class InFlightCounts(Counter[str]):
    """Worker id -> requests in flight there, telling its watchers which counts changed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._watchers: list[weakref.ref[MovedWorkers]] = []
        super().__init__(*args, **kwargs)

    def watch(self) -> MovedWorkers:
        """A set that gets every worker id whose count changes from now on (the watcher
        clears it; it is forgotten here once the watcher drops it)."""
        moved = MovedWorkers()
        self._watchers = [r for r in self._watchers if r() is not None]
        self._watchers.append(weakref.ref(moved))
        return moved

    def _moved(self, key: str) -> None:
        for r in self._watchers:
            m = r()
            if m is not None:
                m.add(key)

    def _all_moved(self) -> None:
        for r in self._watchers:
            m = r()
            if m is not None:
                m.all_moved = True

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        if self._watchers:
            self._moved(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        if self._watchers:
            self._moved(key)

    # the changes that do not go key by key through the two above
    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(*args, **kwargs)
        self._all_moved()

    def clear(self) -> None:
        super().clear()
        self._all_moved()

    def pop(self, *args: Any) -> Any:  # type: ignore[override]
        out = super().pop(*args)
        self._all_moved()
        return out

    def popitem(self) -> tuple[str, int]:
        out = super().popitem()
        self._all_moved()
        return out

    def setdefault(self, key: str, default: int = 0) -> int:  # type: ignore[override]
        out = super().setdefault(key, default)
        self._moved(key)
        return out
