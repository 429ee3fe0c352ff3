"""A routing decision's explanation: what the cost model saw of each candidate worker, as rows
for the routing audit's log line (services/gateway/audit_ticket.py).

The kv policy prices its candidates while deciding; turning those figures into rows (a dict
per candidate, rounded) is the log line's work, so :class:`CandidateRows` does it only when the
rows are first read, and keeps them from then on. A decision nobody logs never formats them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

__all__ = ["CandidateRows"]


class CandidateRows(Sequence[dict[str, Any]]):
    """The rows ``make()`` returns, made on the first read (length, item, iteration,
    comparison) and kept: a sequence equal to the tuple of those rows."""

    __slots__ = ("_make", "_rows")

    def __init__(self, make: Callable[[], Iterable[dict[str, Any]]]) -> None:
        """``make``: returns the rows; called at most once. What it reads must not change
        after the decision (the policy hands it figures fixed at the decision)."""
        self._make: Callable[[], Iterable[dict[str, Any]]] | None = make
        self._rows: tuple[dict[str, Any], ...] | None = None

    @property
    def rows(self) -> tuple[dict[str, Any], ...]:
        """The rows, made now if not yet."""
        if self._rows is None:
            assert self._make is not None
            self._rows = tuple(self._make())
            self._make = None  # what it held (the candidates) is no longer needed
        return self._rows

    def __getitem__(self, i: Any) -> Any:
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CandidateRows):
            return self.rows == other.rows
        if isinstance(other, tuple):
            return self.rows == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # rows of dicts, as the tuple it stands for

    def __repr__(self) -> str:
        return repr(self.rows)
