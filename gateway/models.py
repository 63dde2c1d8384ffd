"""Model endpoints: the registry as clients see it, with live worker counts from the broker."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from common.topology import DOWNLOAD_KEY, Topology
from gateway.broker import QueueStats
from gateway.errors import ApiError, reads_query
from gateway.keys import BROKER, REGISTRY, SETTINGS
from schemas.api import ModelInfo, ModelList
from schemas.registry import ModelSpec


def describe(spec: ModelSpec, stats: QueueStats | None) -> dict[str, Any]:
    source = {"repo": spec.repo, "revision": spec.revision} if spec.repo else {"path": str(spec.path)}
    return {
        "id": spec.id,
        "family": spec.family,
        "description": spec.description,
        "source": source,
        "modes": spec.modes,
        "fast_tier_modes": [
            mode for mode in spec.modes if spec.speed.fast is not None and spec.speed.fast.covers(mode)
        ],
        "native_fps": spec.native_fps,
        "defaults": spec.defaults.model_dump() | {"fps": spec.defaults.fps or spec.native_fps},
        "limits": spec.limits.model_dump(),
        "rules": {"size_multiple": spec.size_multiple, "num_frames": f"{spec.frame_step}k+1"},
        "max_queue_s": spec.max_queue_s,
        "max_queue_depth": spec.max_queue_depth,
        "workers": None if stats is None else stats.consumers,
        "queue_depth": None if stats is None else stats.messages,
        "queue_depth_by_priority": None if stats is None else stats.waiting,
    }


def _json(model: BaseModel) -> web.Response:
    return web.json_response(model.model_dump(mode="json"))


async def _stats(request: web.Request, model_id: str) -> QueueStats | None:
    broker = request.app[BROKER]
    topology = Topology(request.app[SETTINGS].broker_namespace)
    try:
        if model_id == DOWNLOAD_KEY:
            return await broker.stats_of(topology.downloads_queue)
        return await broker.model_stats(model_id)
    except Exception:
        return None  # broker unreachable: say "unknown" rather than fail the listing


async def list_models(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    models = [describe(spec, await _stats(request, spec.id)) for spec in registry.models.values()]
    return _json(ModelList(default_model=registry.default_model, models=models))


@reads_query("model")
async def model_info(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    model_id = request.query.get("model", registry.default_model)
    spec = registry.get(model_id)
    if spec is None:
        raise ApiError(404, "model_not_found", registry.unknown(model_id))
    info = describe(spec, await _stats(request, spec.id))
    downloads = await _stats(request, DOWNLOAD_KEY)
    info["download_workers"] = None if downloads is None else downloads.consumers
    return _json(ModelInfo(**info))
