"""A process that holds MESSAGEs and upserts bindings forever, printing each acknowledgement.

The kill -9 test runs it, reads acknowledgements, kills it with SIGKILL mid-stream and then
checks that every acknowledged write is in the reopened store.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sipwake.store import Binding, HeldMessage, open_url, push_key_for
from sipwake.store.sqlite import SqliteStore


async def main(path: str, data_dir: Path) -> None:
    """``path``: a SQLite file, or a store URL (``redis://…``) for a cluster node."""
    if "://" in path:
        store = await open_url(path, data_dir)
    else:
        store = await SqliteStore.open(Path(path), data_dir)
    n = 0
    out = sys.stdout

    async def one(i: int) -> None:
        if i % 2:
            body = f"MESSAGE {i}".encode()
            mid = await store.messages.add(
                HeldMessage("sip:bob@example.com", body, 0.0, 1e12, id=f"m{i}")
            )
            out.write(f"message {mid}\n")
        else:
            b = Binding(
                aor=f"sip:user{i}@example.com",
                contact=f"sip:u@10.0.0.1:{i}",
                registered_at=0.0,
                expires_at=1e12,
                push_key=push_key_for("apns", [f"tok{i}"]),
            )
            await store.bindings.upsert(b)
            out.write(f"binding {b.aor}\n")
        out.flush()

    while True:
        await asyncio.gather(*(one(n + k) for k in range(16)))
        n += 16


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
