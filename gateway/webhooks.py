"""Webhooks: each job event a client asked for is POSTed to its URL, signed the Standard Webhooks
way, retried with backoff, at least once, and never on the job's own path.

Gateways with a signing secret share the queue `<ns>.webhooks` (bound to every job event); each
message is one attempt at one event, made by one of them, and acked only once the attempt
succeeded, was the last, or its event was put, for the next attempt, into the delay queue of the
pause before it (`<ns>.webhooks.wait.<n>s`, which dead-letters it back): a gateway that dies
mid-attempt leaves it to another, and the pauses hold no gateway's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections import Counter, OrderedDict
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from standardwebhooks import Webhook as Signer

from common.settings import GatewaySettings
from common.store import ObjectStore
from common.topology import WEBHOOK_PAUSES_S, Topology
from gateway.broker import channel_closed, transient
from gateway.views import event_frame
from schemas.jobs import Webhook
from schemas.messages import DecodeError, JobEvent, decode

log = structlog.get_logger("gateway.webhooks")

# Jobs whose webhook (or the lack of one) this gateway remembers, to avoid reading the record per event.
KNOWN_JOBS = 10_000
# Most events <ns>.webhooks, and each delay queue, holds.
MAX_WAITING = 100_000
# The attempt a message in <ns>.webhooks is for, when it is not the first (set on its way back from a delay queue).
ATTEMPT_HEADER = "x-videogen-webhook-attempt"
# Pause before an event whose next attempt the broker did not take is tried again.
RETRY_NOT_QUEUED_PAUSE_S = 2.0


def logged_url(url: str) -> str:
    """A webhook URL as logs show it: without the user name and password it may carry."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def receiver_of(url: str) -> str:
    """The receiver a webhook URL names, for its share of the attempts: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


async def destination_problem(url: str, allow: list[str], delivering: bool = False) -> str | None:
    """Why `url` may not receive webhooks (private, loopback, unresolvable...), or None if it may.
    `delivering`: a lookup that failed without saying the name does not exist (a DNS time-out,
    SERVFAIL) raises OSError instead, so the attempt is tried again later."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "the URL must be http or https with a host"
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "the URL's port is not a number from 1 to 65535"
    if host in allow:
        return None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except UnicodeError:  # a name IDNA cannot encode: a label over 63 characters, an empty label
        return f"the host {host!r} is not a valid host name"
    except OSError as exc:
        if delivering and not _no_such_host(exc):  # the resolver failed, for now: not an answer
            raise
        return f"the host {host!r} does not resolve ({exc.strerror or exc})"
    for *_, sockaddr in infos:
        if problem := _address_problem(host, sockaddr[0], allow):
            return problem
    return None


def _no_such_host(exc: OSError) -> bool:
    gone = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    return isinstance(exc, socket.gaierror) and exc.errno in gone


# IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits: NAT64 (well-known
# and local-use) and the deprecated IPv4-compatible form. A gateway's network may route them to that
# IPv4 address, so it is the one checked.
_EMBEDDING_IPV4 = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96")]


def _reachable(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The address and every IPv4 address it may stand for (mapped, 6to4, Teredo, NAT64, IPv4-compatible)."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        found += [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if v4 is not None]
        if any(ip in net for net in _EMBEDDING_IPV4):
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _address_problem(host: str, address: str, allow: list[str]) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    if _allowed(ip, allow):
        return None
    # Site-local (fec0::/10) is deprecated, but still routed inside some networks; multicast
    # addresses (some of which Python counts as global) name groups, not a receiver.
    if all(a.is_global and not a.is_multicast and not (a.version == 6 and a.is_site_local) for a in _reachable(ip)):
        return None
    return (
        f"{host} resolves to {ip}, a private, loopback, multicast or reserved address; such hosts must be "
        "listed in VIDEOGEN_WEBHOOK_ALLOW_HOSTS"
    )


class DestinationRefused(OSError):
    """The addresses a webhook's host resolved to when its delivery connected include one it may
    not reach."""


class CheckedResolver(AbstractResolver):
    """The webhook client's resolver: it checks the very addresses a delivery then connects to, so
    a host whose DNS answer changes after `destination_problem` looked (DNS rebinding) still
    cannot reach a private or loopback address. (URLs with an IP address connect without a
    resolver; `destination_problem` checks those, and their address cannot change.)"""

    def __init__(self, allow: list[str], inner: AbstractResolver | None = None) -> None:
        self._allow = allow
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() not in self._allow:
            for result in results:
                if problem := _address_problem(host, result["host"], self._allow):
                    raise DestinationRefused(problem)
        return results

    async def close(self) -> None:
        await self._inner.close()


def webhook_client(settings: GatewaySettings, resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """The HTTP client deliveries go through: its connections reach only checked addresses."""
    connector = aiohttp.TCPConnector(resolver=CheckedResolver(settings.webhook_allow_hosts, resolver))
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_s))


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: list[str]) -> bool:
    for entry in allow:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry
    return False


def event_type(event: JobEvent) -> str:
    return f"job.{event.status}"


class WebhookDeliverer:
    def __init__(self, settings: GatewaySettings, store: ObjectStore, topology: Topology) -> None:
        assert settings.webhook_secret is not None
        self._settings = settings
        self._signer = Signer(settings.webhook_secret.get_secret_value())
        self._store = store
        self._topology = topology
        self._known: OrderedDict[str, Webhook | None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._attempting: Counter[str] = Counter()  # attempts under way, by receiver
        self._http: aiohttp.ClientSession | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._closing = False

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._http = webhook_client(self._settings)
        channel = self._channel = await connection.channel()  # with publisher confirms
        await channel.set_qos(prefetch_count=self._settings.webhook_concurrency)
        queue = await channel.declare_queue(
            self._topology.webhooks_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # Bounded: if no gateway delivers for a long time, the oldest events go first.
                "x-max-length": MAX_WAITING,
                "x-overflow": "drop-head",
            },
        )
        for pause in WEBHOOK_PAUSES_S:
            await channel.declare_queue(
                self._topology.webhook_wait_queue(pause),
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": pause * 1000,
                    "x-dead-letter-exchange": "",  # the default exchange: straight back into <ns>.webhooks
                    "x-dead-letter-routing-key": self._topology.webhooks_queue,
                    # Kept until <ns>.webhooks has it (at-least-once dead-lettering needs reject-publish).
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    "x-max-length": MAX_WAITING,
                },
            )
        await queue.bind(self._topology.events_exchange, routing_key="job.#")
        self._queue = queue
        self._consumer_tag = await queue.consume(self._on_event)

    async def close(self) -> None:
        # First no more messages, then the attempts under way end (their messages stay unacked,
        # and the broker hands them to another gateway), then the HTTP client.
        self._closing = True
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        if self._closing:  # delivered as the consumer was being cancelled: left to the broker
            return
        try:
            event = decode(message.body)
        except DecodeError:
            await message.ack()
            return
        if not isinstance(event, JobEvent):
            await message.ack()
            return
        while True:
            try:
                # A terminal event carries the record as it ended; others are looked up (and remembered).
                hook = event.job.webhook if event.job is not None else await self._webhook_of(event.job_id)
                break
            except Exception as exc:  # store trouble: try again, holding the event (not handed back,
                # which RabbitMQ 4 counts against its quorum queues' default delivery limit)
                log.warning("webhook_lookup_failed", job_id=event.job_id, error=str(exc))
                await asyncio.sleep(2.0)
                if self._closing or channel_closed(message):  # the broker has it back (once the channel closes)
                    return
                if not transient(exc):  # not the store being away: do not hold a slot for good
                    await message.nack(requeue=True)
                    return
        if hook is None or event_type(event) not in hook.events:
            await message.ack()
            return
        receiver = receiver_of(hook.url)
        if self._attempting[receiver] >= self._settings.webhook_per_receiver:
            # The receiver has its share of the slots: the event waits the shortest pause in the
            # broker, holding no slot, and comes back for the same attempt.
            task = asyncio.create_task(self._postpone(message, attempt_of(message)))
        else:
            self._attempting[receiver] += 1
            task = asyncio.create_task(self._deliver(message, event, hook, attempt_of(message)))
            task.add_done_callback(lambda _: self._done_with(receiver))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _done_with(self, receiver: str) -> None:
        self._attempting[receiver] -= 1
        if self._attempting[receiver] <= 0:
            del self._attempting[receiver]

    async def _postpone(self, message: AbstractIncomingMessage, attempt: int) -> None:
        await self._send_later_patiently(message, attempt, pause=WEBHOOK_PAUSES_S[0])
        with contextlib.suppress(Exception):  # as in _deliver: the broker has it back if this fails
            await message.ack()

    async def _webhook_of(self, job_id: str) -> Webhook | None:
        if job_id not in self._known:
            record = await self._store.get_record(job_id)
            self._known[job_id] = None if record is None else record.webhook
            while len(self._known) > KNOWN_JOBS:
                self._known.popitem(last=False)
        return self._known[job_id]

    async def _deliver(self, message: AbstractIncomingMessage, event: JobEvent, hook: Webhook, attempt: int) -> None:
        """One attempt. If it fails and attempts are left, the event goes to the delay queue of
        the pause that follows this attempt, and comes back for the next one: the pause holds
        none of this gateway's `webhook_concurrency` slots."""
        with structlog.contextvars.bound_contextvars(job_id=event.job_id, seq=event.seq, url=logged_url(hook.url)):
            if await self._attempt(event, hook, attempt):
                pass
            elif attempt >= self._settings.webhook_max_attempts:
                log.error("webhook_given_up", attempts=attempt)
            else:
                await self._send_later_patiently(message, attempt + 1)
        # On a channel that closed meanwhile (the connection dropped) the ack fails; the broker has
        # put the message back, and that attempt is made again: at least once.
        with contextlib.suppress(Exception):
            await message.ack()

    async def _send_later_patiently(
        self, message: AbstractIncomingMessage, attempt: int, pause: int | None = None
    ) -> None:
        """Put the event in its delay queue; while the broker refuses (a delay queue full, say),
        keep the message, and its slot, and try again after 2 s, doubling to a minute. Handing the
        message back instead would make the same attempt again at once, without a pause."""
        wait = RETRY_NOT_QUEUED_PAUSE_S
        while True:
            if channel_closed(message):  # the broker has it back and delivers it again: no second copy
                return
            try:
                await self._send_later(message, attempt, pause)
                return
            except Exception as exc:
                log.warning(
                    "webhook_retry_not_queued",
                    # The attempt that failed; a postponed event (`pause` given) has made none yet.
                    attempt=attempt - 1 if pause is None else attempt,
                    postponed=pause is not None,
                    error=str(exc) or type(exc).__name__,
                )
                await asyncio.sleep(wait)
                wait = min(wait * 2, 60.0)

    async def _attempt(self, event: JobEvent, hook: Webhook, attempt: int) -> bool:
        """POST the event once: whether the delivery is over (delivered, or refused for good)."""
        assert self._http is not None
        try:
            problem = await destination_problem(hook.url, self._settings.webhook_allow_hosts, delivering=True)
        except OSError as exc:  # no answer from DNS now: a failed attempt, tried again later
            log.warning("webhook_unreachable", attempt=attempt, error=f"DNS lookup failed: {exc}")
            return False
        if problem is not None:  # checked again now: DNS may have changed since submission
            log.warning("webhook_refused", reason=problem)
            return True
        delivery_id = f"{event.job_id}:{event.seq}"  # stable across retries: receivers deduplicate on it
        # Made per attempt: a terminal event's presigned link is fresh each time.
        frame = event_frame(event, self._store, self._settings.presign_expiry_s)
        body = json.dumps({"type": event_type(event), "timestamp": event.timestamp.isoformat(), "data": frame})
        sent_at = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "videogen-webhooks",
            "webhook-id": delivery_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(delivery_id, sent_at, body),
        }
        try:
            async with self._http.post(hook.url, data=body, headers=headers, allow_redirects=False) as reply:
                if 200 <= reply.status < 300:
                    log.info("webhook_delivered", attempt=attempt, status=reply.status)
                    return True
                log.warning("webhook_rejected", attempt=attempt, status=reply.status)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DestinationRefused):  # the host's DNS answer changed
                log.warning("webhook_refused", reason=str(exc.os_error))
                return True
            log.warning("webhook_unreachable", attempt=attempt, error=str(exc) or type(exc).__name__)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("webhook_unreachable", attempt=attempt, error=str(exc) or type(exc).__name__)
        return False

    async def _send_later(self, message: AbstractIncomingMessage, attempt: int, pause: int | None = None) -> None:
        """A copy of the event, numbered for its next attempt, into the delay queue of the pause
        before it (or of `pause`), confirmed, before the original is acknowledged: at least once."""
        assert self._channel is not None
        if pause is None:
            pause = WEBHOOK_PAUSES_S[min(attempt - 1, len(WEBHOOK_PAUSES_S)) - 1]
        later = aio_pika.Message(
            message.body,
            content_type=message.content_type,
            type=message.type,
            message_id=message.message_id,
            headers={ATTEMPT_HEADER: attempt},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._channel.default_exchange.publish(
            later, routing_key=self._topology.webhook_wait_queue(pause), mandatory=True
        )


def attempt_of(message: AbstractIncomingMessage) -> int:
    """Which attempt this message is for: 1 for an event from <ns>.events, else as numbered."""
    value = (message.headers or {}).get(ATTEMPT_HEADER, 1)
    return value if isinstance(value, int) and value >= 1 else 1
