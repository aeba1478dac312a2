"""The rejected-token webhook: a JSON POST for every token a provider declares dead.

Subscribed to the push service, so it reports rejections from every entry point (HTTP API,
SIP). Posts run in the background; a failing webhook is logged and never delays a push.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from sipwake.push.request import Destination, PushResult

log = logging.getLogger("sipwake.api.webhook")


class RejectedTokenWebhook:
    """Posts ``{"event": "token-rejected", "provider", "app_id", "token", "reason"}``."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, destination: Destination, result: PushResult) -> None:
        body = {
            "event": "token-rejected",
            "provider": destination.provider.value,
            "app_id": destination.app_id,
            "service": destination.service.value,
            "token": destination.token,
            "reason": result.reason,
        }
        task = asyncio.get_running_loop().create_task(self._post(body, destination))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, body: dict[str, str], destination: Destination) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                self.url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status >= 300:
                    log.warning(
                        "rejected-token webhook answered %s for %s",
                        resp.status,
                        destination.token_prefix(),
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("rejected-token webhook failed for %s: %s", destination.token_prefix(), exc)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
