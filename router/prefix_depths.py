"""A lookup's answer grouped by prefix length, so that a decision can take the holders of the
longest prefixes without visiting every holder.

:class:`PrefixDepths` is the plain ``{worker id: longest cached prefix (blocks)}`` mapping a
lookup returns, with its workers also listed per length, longest first (``levels``): the
shortlist (router/shortlist.py) reads the few it keeps off the deepest levels, where a
system prompt held by hundreds of workers would otherwise be sorted whole on every decision.
"""

from __future__ import annotations

__all__ = ["PrefixDepths"]


class PrefixDepths(dict[str, int]):
    """Worker id -> longest cached prefix, plus ``levels``: ``(blocks, [worker id, ...])``
    with blocks > 0, longest first; every worker of the mapping is in exactly one level.
    Only the lookup that made it fills it: a copy (``dict(x)``) or a changed one is a plain
    mapping to its readers again (they check ``levels_valid``)."""

    __slots__ = ("levels", "_size")

    def __init__(self) -> None:
        super().__init__()
        self.levels: list[tuple[int, list[str]]] = []
        self._size = 0

    def add_level(self, blocks: int, workers: list[str]) -> None:
        """Append the workers holding exactly ``blocks`` blocks (shorter than every level
        added before)."""
        if workers:
            self.levels.append((blocks, workers))
            self.update(dict.fromkeys(workers, blocks))
            self._size = len(self)

    def raise_to(self, worker: str, blocks: int) -> None:
        """Make ``worker``'s prefix at least ``blocks`` (> 0) long, keeping ``levels``
        valid: the worker moves to (or joins) that level when it held less."""
        old = self.get(worker, 0)
        if blocks <= old:
            return
        levels = self.levels
        valid = self.levels_valid
        self[worker] = blocks
        if not valid:  # already a plain mapping to its readers
            return
        if old:
            for i, (b, ws) in enumerate(levels):
                if b == old:
                    ws.remove(worker)
                    if not ws:
                        del levels[i]
                    break
        i = 0
        while i < len(levels) and levels[i][0] > blocks:
            i += 1
        if i < len(levels) and levels[i][0] == blocks:
            levels[i][1].append(worker)
        else:
            levels.insert(i, (blocks, [worker]))
        self._size = len(self)

    @property
    def levels_valid(self) -> bool:
        """Whether ``levels`` still lists exactly the mapping (no entry added or removed
        since the lookup; an entry changed in place is not detected: don't)."""
        return self._size == len(self)
