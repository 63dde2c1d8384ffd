"""Live job events for clients: WebSocket `GET /api/v1/ws` and Server-Sent Events `GET /api/v1/events`.

Both take `job_id` (repeatable) or `all=true`, and `since=<seq>` with a single job to resume after
the last event seen; SSE also honours the `Last-Event-ID` header its clients send on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp_sse import sse_response

from gateway.errors import ApiError, reads_query
from gateway.streams import Ended, StreamRequest, open_stream, pump

# The close code of a stream by why it ended: 1000 only when every listed job has ended (a
# client that stopped listening sees none). Any other end: reconnect with `since`.
CLOSE = {
    Ended.DONE: (WSCloseCode.OK, b""),
    Ended.TOO_SLOW: (WSCloseCode.TRY_AGAIN_LATER, b"too far behind; reconnect with since"),
    Ended.GAP: (WSCloseCode.TRY_AGAIN_LATER, b"events missed while the store is away; reconnect with since"),
    Ended.SHUTDOWN: (WSCloseCode.GOING_AWAY, b"the gateway is stopping; reconnect with since"),
}

# The largest frame a client may send (it is ignored); a larger one closes the stream with 1009.
MAX_CLIENT_FRAME = 64 * 1024


@reads_query("all", "since", "access_token", repeatable=("job_id",))
async def job_events(request: web.Request) -> web.WebSocketResponse:
    async with open_stream(request.app, StreamRequest.parse(request)) as stream:
        # aiohttp refuses a message of max_msg_size bytes itself: one more allows MAX_CLIENT_FRAME.
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_CLIENT_FRAME + 1)
        if not ws.can_prepare(request).ok:
            raise ApiError(
                400,
                "bad_request",
                "GET /api/v1/ws takes WebSocket upgrades only (Connection: Upgrade, Upgrade: websocket); "
                "for events over plain HTTP use GET /api/v1/events",
            )
        await ws.prepare(request)
        reader = asyncio.ensure_future(_drain_client(ws))
        taken = True  # False: the client took no data for SEND_TIMEOUT_S (an error in the stream leaves it True)
        try:
            taken = await pump(stream.frames(), ws.send_json, reader)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if not taken and request.transport is not None:  # it takes no data: no close handshake either
                request.transport.abort()
            code, reason = CLOSE.get(
                stream.ended, (WSCloseCode.INTERNAL_ERROR, b"the stream failed; reconnect with since")
            )
            # Bounded: a client that stopped taking data would hold the close handshake for ever.
            # A stopping gateway reads nothing more (aiohttp drops what arrives once the server
            # shuts down), so the client's answer to the close cannot come: the connection is
            # closed after a second, which clients that wait for it (browsers) take as the end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.close(code=code, message=reason), 1 if stream.ended is Ended.SHUTDOWN else 10)
        return ws


@reads_query("all", "since", "access_token", repeatable=("job_id",))
async def job_events_sse(request: web.Request) -> web.StreamResponse:
    stream_request = StreamRequest.parse(request, request.headers.get("Last-Event-ID"))
    async with open_stream(request.app, stream_request) as stream:
        if stream.already_over:
            # What an EventSource sends when it reconnects after its job's stream ended: 204 is
            # how a server tells it to stop reconnecting (it closes, readyState CLOSED).
            return web.Response(status=204)
        async with sse_response(request, ping_interval=15) as sse:

            async def send(frame: dict) -> None:
                # The id lets EventSource resume with Last-Event-ID.
                await sse.send(json.dumps(frame), id=stream.event_id(frame), event="job.event")

            if not await pump(stream.frames(), send, asyncio.ensure_future(sse.wait())) and request.transport:
                request.transport.abort()  # it takes no data: ending the response would wait on it
        return sse


async def _drain_client(ws: web.WebSocketResponse) -> None:
    """Clients only listen; read until they close so pings and the close handshake are handled."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
