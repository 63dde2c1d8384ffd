"""Typed keys for what the gateway application owns."""

from __future__ import annotations

import asyncio

from aiohttp import web

from common.settings import GatewaySettings
from common.store import ObjectStore
from gateway.auth import Keys
from gateway.broker import GatewayBroker
from gateway.events import EventHub
from gateway.webhooks import WebhookDeliverer
from schemas.registry import Registry

SETTINGS = web.AppKey("settings", GatewaySettings)
REGISTRY = web.AppKey("registry", Registry)
STORE = web.AppKey("store", ObjectStore)
BROKER = web.AppKey("broker", GatewayBroker)
HUB = web.AppKey("hub", EventHub)
WEBHOOKS = web.AppKey("webhooks", WebhookDeliverer)
KEYS = web.AppKey("keys", Keys | None)  # None: auth disabled
SUBMISSIONS = web.AppKey("submissions", set)  # submissions running to their end (handlers.run_to_end)
# Submissions that may carry a file and are being read or held (handlers.upload_slot).
UPLOAD_SLOTS = web.AppKey("upload_slots", asyncio.Semaphore)
# Each API key's share of those slots (half of them, at least one); "" without auth.
UPLOAD_SLOTS_BY_KEY = web.AppKey("upload_slots_by_key", dict)
# Each API key's open WebSocket and SSE streams on this gateway (streams.open_stream); "" without auth.
STREAMS = web.AppKey("streams", dict)
