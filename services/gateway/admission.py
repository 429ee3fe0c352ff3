"""The gateway's admission limits: generation requests served at once, overall and per client,
HTTP and gRPC together. Past a limit a request is refused at once (HTTP 429 with `Retry-After`,
gRPC RESOURCE_EXHAUSTED), never queued."""

from __future__ import annotations

from services.gateway.errors import APIError

RETRY_AFTER_S = 1


class Admission:
    """Counts generation requests in flight, overall and by client name."""

    def __init__(self, limit: int, per_client: int = 0) -> None:
        self.limit = limit
        self.per_client = per_client
        self.in_flight = 0
        self.by_client: dict[str, int] = {}

    def admit(self, client: str = "") -> APIError | None:
        """Count one request of `client`; or the 429 error that refuses it (nothing counted)."""
        if self.in_flight >= self.limit:
            return APIError(429, f"the gateway is at its limit of {self.limit} requests in "
                            "flight; retry later", type="rate_limit_error",
                            code="too_many_requests")
        mine = self.by_client.get(client, 0)
        if self.per_client and mine >= self.per_client:
            return APIError(429, f"this client is at its limit of {self.per_client} requests "
                            "in flight; retry later", type="rate_limit_error",
                            code="too_many_requests")
        self.in_flight += 1
        self.by_client[client] = mine + 1
        return None

    def release(self, client: str = "") -> None:
        """The end of a request `admit` counted."""
        self.in_flight -= 1
        left = self.by_client.get(client, 1) - 1
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)
