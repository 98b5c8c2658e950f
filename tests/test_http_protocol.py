"""The service's uvicorn protocol sends each response's head and body in one write."""

from __future__ import annotations

import asyncio
from typing import Any

from heinfer.server.http import OneWriteHttpToolsProtocol, _HeadHoldingTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"


class RecordingTransport:
    """Stands in for the socket transport: records what would reach the socket, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, parts: Any) -> None:
        self.calls.append(("writelines", tuple(parts)))

    def close(self) -> None:
        self.calls.append(("close", None))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_head_and_body_leave_in_one_call_and_a_lone_head_still_leaves() -> None:
    async def main() -> None:
        raw = RecordingTransport()
        transport = _HeadHoldingTransport(raw)  # type: ignore[arg-type]
        transport.write(HEAD)
        transport.write(b"body")
        assert raw.calls == [("writelines", (HEAD, b"body"))]
        await asyncio.sleep(0)  # the scheduled flush finds nothing held
        assert len(raw.calls) == 1

        transport.write(HEAD)  # a head with no body (204, HEAD, a stream not yet begun)
        assert len(raw.calls) == 1
        await asyncio.sleep(0)
        assert raw.calls[-1] == ("write", HEAD)

        transport.write(b"plain bytes")  # not a response head: written at once
        assert raw.calls[-1] == ("write", b"plain bytes")

        transport.write(HEAD)
        transport.close()  # a held head is never lost to a close
        assert raw.calls[-2:] == [("write", HEAD), ("close", None)]
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)

    asyncio.run(main())


def test_uvicorn_with_the_service_protocol_answers_in_one_write() -> None:
    """A real uvicorn protocol on a real loopback socket, its writes spied on."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    config = Config(app=app, lifespan="off", log_level="warning")
    config.load()
    state = ServerState()
    seen: list[tuple[str, Any]] = []

    class Spied(OneWriteHttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            real = self.transport._transport  # type: ignore[attr-defined]
            self.transport._transport = _Forwarding(real, seen)  # type: ignore[attr-defined]

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Spied(config=config, server_state=state, app_state={}), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(5)
        writer.close()
        server.close()
        return head + body

    answer = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"hello")
    assert [kind for kind, _ in seen] == ["writelines"]  # head and body together, once
    head, body = seen[0][1]
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello"


class _Forwarding:
    """Records each write reaching the real transport, then makes it."""

    def __init__(self, real: Any, seen: list[tuple[str, Any]]) -> None:
        self._real, self._seen = real, seen

    def write(self, data: bytes) -> None:
        self._seen.append(("write", data))
        self._real.write(data)

    def writelines(self, parts: Any) -> None:
        parts = tuple(parts)
        self._seen.append(("writelines", parts))
        self._real.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
