"""uvicorn's httptools protocol, with each response's head and body in one write.

uvicorn writes the status line and headers when the app sends `http.response.start` and the
body on `http.response.body`: two `write` syscalls and two TCP segments per response, so a
client wakes up for a 170-byte head and then again for the body. Every inference answer
passes through the one service process, where the head's write was its most expensive line of
Python under load (py-spy: 12% of its samples). Here the head is held until the body's write
in the same event-loop iteration and both leave in one `writev`; a head with no body following
in that iteration (streaming, HEAD, 204) is written at the end of the iteration, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["OneWriteHttpToolsProtocol"]

_HEAD_PREFIX = b"HTTP/"
_MAX_HEAD_BYTES = 8192


class _HeadHoldingTransport:
    """A transport proxy holding a response head until the next write or loop iteration."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif len(data) <= _MAX_HEAD_BYTES and data.startswith(_HEAD_PREFIX):
            self._held = data
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn.run(..., http=OneWriteHttpToolsProtocol)`: see the module docstring."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeadHoldingTransport(transport))  # type: ignore[arg-type]
