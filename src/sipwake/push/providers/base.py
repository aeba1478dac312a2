"""The one interface every push provider implements (like Sygnal's pushkins)."""

from __future__ import annotations

from typing import Protocol

from sipwake.push.request import Destination, PushRequest, PushResult


class PushProvider(Protocol):
    """Sends pushes to one provider (APNs, FCM, Web Push, an external HTTP pusher).

    ``send`` never raises for a push that failed: every outcome, including a network
    failure or a refused payload, comes back as a :class:`PushResult`.
    """

    name: str

    def accepts(self, destination: Destination) -> bool:
        """Whether this provider is configured to reach ``destination``."""
        ...

    async def send(self, request: PushRequest) -> PushResult:
        """Send one push and wait for the provider's answer (retries included)."""
        ...

    async def aclose(self) -> None:
        """Close connections; pushes under way are answered first."""
        ...
