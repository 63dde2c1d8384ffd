"""`GET /api/v1/ws?job_id=…`: one JSON text frame per event of the job, ending with the terminal one."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import WSMsgType, web

from gateway.errors import ApiError
from gateway.handlers import parse_job_id
from gateway.keys import HUB, SETTINGS, STORE
from gateway.views import event_frame
from schemas.messages import JobEvent

log = structlog.get_logger("gateway.ws")


async def job_events(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    if "job_id" not in request.query:
        raise ApiError(400, "missing_parameter", "query parameter job_id is required")
    job_id = parse_job_id(request.query["job_id"])
    store, expiry = app[STORE], app[SETTINGS].presign_expiry_s

    with app[HUB].subscribe(job_id) as sub:
        record = await store.get_record(job_id)
        if record is None:
            raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)

        # What this gateway already saw of the job, then live events. A gateway that saw none
        # of it (it started after the job did) begins with the stored state instead. When the
        # record is ahead of the backlog, the missing events are still on their way here.
        pending = sub.backlog or [JobEvent.from_record(record)]
        if record.status.is_terminal and record.seq > pending[-1].seq:
            pending.append(JobEvent.from_record(record))  # the job ended; never leave a client waiting
        last_seq = -1
        reader = asyncio.create_task(_drain_client(ws))
        try:
            while True:
                for event in pending:
                    if event.seq <= last_seq:
                        continue  # seen already: never a duplicate or a step backwards
                    await ws.send_json(event_frame(event, store, expiry))
                    last_seq = event.seq
                    if event.status.is_terminal:
                        return ws
                pending = await _next_events(sub.queue, reader)
                if pending is None:
                    return ws
        except ConnectionResetError:
            return ws
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await ws.close()


async def _next_events(queue: asyncio.Queue[JobEvent | None], reader: asyncio.Task[None]) -> list[JobEvent] | None:
    """Wait for the next event; None when the client went away or the gateway is shutting down."""
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
    if getter not in done:
        getter.cancel()
        await asyncio.gather(getter, return_exceptions=True)
        return None
    first = getter.result()
    if first is None:
        return None
    events = [first]
    while not queue.empty():
        event = queue.get_nowait()
        if event is None:
            queue.put_nowait(None)  # keep the shutdown signal for the next wait
            break
        events.append(event)
    return sorted(events, key=lambda e: e.seq)


async def _drain_client(ws: web.WebSocketResponse) -> None:
    """Clients only listen; read until they close so pings and the close handshake are handled."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
