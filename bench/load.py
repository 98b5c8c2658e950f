"""Load benchmark: throughput, latency percentiles and CPU per request under concurrent clients.

    python bench/load.py [--duration 20] [--clients 1 8 32] [--workers 1 2]
                         [--images-per-request 1] [--loadgen raw|httpx] [--batch] [--ray]
                         [--pin] [--rounds 1] [--pairs K [--pair-seconds 6]
                         [--against CHECKOUT] [--single-turns 4]]
                         [--predict-calls 200]

For each worker count it starts a real `heinfer serve` on loopback, gives every simulated
client its own key (uploaded once), pre-encrypts a few request bodies per client (so the load
generator spends its CPU on HTTP, not on encryption), then runs each concurrency level for a
fixed time (`--ray`: once more through two Ray Serve replicas, one per node of a two-node
loopback cluster). Reports requests/s, images/s, p50/p95/p99 latency, errors, the CPU
milliseconds per request spent by the service's HTTP process, its workers and the load
generator, and the resident memory of the service and each worker; after each level it
decrypts the last answer of every client and checks its argmax against the plaintext model.
With `--rounds R` the worker configurations run R times in alternating order (1, 2, 2, 1, ...)
and the scaling ratio is the median over rounds. `--pairs K` measures only that ratio, at the
top client level, from K pairs of adjacent windows with both services up at once (less exposed
to the VM's drift than restarting a service per configuration); with `--against CHECKOUT` the
pairs compare two versions of the code instead, at the same worker count, and are followed by
one-client turns in A B B A order: the service's round trip, and `Client.predict` of one image
as a user calls it (encrypt, HTTP, decrypt; each arm timed with its own checkout's client, in a
fresh interpreter), every answer checked (`--predict-calls`, `--single-turns`); without
`--pairs`, the `Client.predict` figures follow each service's levels. Each round also
measures the compute-only ceiling: evaluations/s of 1 and N independent processes with no
service at all. Writes bench/results/load*.json and a plot. Everything is bounded in time and
loopback-only.

The default load generator (`raw`) writes pre-encoded HTTP/1.1 requests on keep-alive
connections, one asyncio protocol each on uvloop, and reads exactly Content-Length bytes
back: about 0.1 ms of CPU per request against about 1.7 ms for an httpx AsyncClient
(measured here). On a 2-core machine the load
generator shares the cores with the service, so its CPU is taken straight from the second
worker; `--loadgen httpx` is kept for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heinfer
from heinfer.cli import wait_ready
from heinfer.he.backend import SecretKey
from heinfer.plans.linear import LinearCodec
from linear import Service, linear_plan, rowpack_client, rowpack_server

RESULTS = Path(__file__).resolve().parent / "results"
KEY_HEADER = "X-Heinfer-Key-Id"
INFER_PATH = "/v2/models/mnist/infer"
SRC = Path(__file__).resolve().parents[1] / "src"  # this checkout's package
T = TypeVar("T")


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SimulatedClient:
    """One tenant-side user: its own keys, a few encrypted bodies and what they should say."""

    client: heinfer.Client
    key_id: str
    bodies: list[bytes]
    expected: list[np.ndarray]  # plaintext argmax per body
    last: tuple[int, bytes] | None = None  # (body index, response) of the latest answer
    latencies: list[float] = field(default_factory=list)


class _ManifestFallback(httpx.HTTPTransport):
    """Retries a 404 on `/v2/models/{name}/manifest` at `/v2/models/{name}`, where releases
    before the OIP routes (8bbfa1e) serve the manifest: `--against` reaches them with this
    checkout's client, whose wire formats they read."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        path = request.url.path
        if response.status_code == 404 and path.endswith("/manifest"):
            response.close()
            request.url = request.url.copy_with(path=path[: -len("/manifest")])
            response = super().handle_request(request)
        return response


def bench_client(url: str, model: str = "mnist") -> heinfer.Client:
    """`heinfer.Client` that also reads the manifest of services of earlier releases."""
    http = httpx.Client(base_url=url, transport=_ManifestFallback(), timeout=120.0)
    return heinfer.Client(url, model=model, http=http)


def _prepare_clients(
    url: str, count: int, X: np.ndarray, reference: np.ndarray, batch: bool, images: int
) -> list[SimulatedClient]:
    clients = []
    for i in range(count):
        client = bench_client(url)
        key_id = client.upload_keys()
        bodies, expected = [], []
        for k in range(1 if batch else 3):
            if batch:  # one full coeff-batch request (N images) per client
                rows = np.arange(client.batch_capacity) + i
                bodies.append(client.encrypt(X[rows % len(X)], layout="coeff-batch"))
            else:
                rows = (np.arange(images) + (i * 3 + k) * images) % len(X)
                bodies.append(client.encrypt(X[rows]))
            expected.append(reference[rows % len(X)].argmax(axis=1))
        clients.append(SimulatedClient(client, key_id, bodies, expected))
    return clients


class _RawConnection(asyncio.Protocol):
    """One simulated client's keep-alive HTTP/1.1 connection, driven from the protocol's
    callbacks: a whole answer in `data_received` sends the next request at once, with no
    coroutine, future or stream buffer per request."""

    def __init__(
        self, sim: SimulatedClient, heads: list[bytes], deadline: float, errors: dict[str, int]
    ) -> None:
        self.sim, self.heads, self.deadline, self.errors = sim, heads, deadline, errors
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self._buffer = bytearray()
        self._head: tuple[int, int, bool] | None = None  # status, length, connection: close
        self._index = 0
        self._started = 0.0
        self._waiting = False  # a request is out and its answer not complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send_next()

    def _send_next(self) -> None:
        assert self.transport is not None
        if time.monotonic() >= self.deadline:
            self.transport.close()
            return
        self._index = self.sent % len(self.sim.bodies)
        self.sent += 1
        self._started = time.perf_counter()
        self._waiting = True
        self.transport.writelines((self.heads[self._index], self.sim.bodies[self._index]))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head = _parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
        status, length, close = self._head
        if len(self._buffer) < length:
            return
        payload = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._head = None
        self._waiting = False
        if status == 200:
            self.sim.latencies.append((time.perf_counter() - self._started) * 1e3)
            self.sim.last = (self._index, payload)
        else:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1
        if close:
            assert self.transport is not None
            self.transport.close()
        else:
            self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting or exc is not None:
            name = type(exc).__name__ if exc is not None else "ConnectionClosed"
            self.errors[name] = self.errors.get(name, 0) + 1
        if not self.closed.done():
            self.closed.set_result(None)


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            close = True
    return int(lines[0][9:12]), length, close


def _factory(protocol: _RawConnection) -> Callable[[], _RawConnection]:
    return lambda: protocol


async def _raw_client(
    url: str, sim: SimulatedClient, deadline: float, errors: dict[str, int]
) -> None:
    """Pre-encoded requests on one keep-alive connection; a new connection after any error."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    heads = [
        (
            f"POST {INFER_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/octet-stream\r\n{KEY_HEADER}: {sim.key_id}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for body in sim.bodies
    ]
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        connection = _RawConnection(sim, heads, deadline, errors)
        try:
            await loop.create_connection(_factory(connection), host, port)
        except OSError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.05)
            continue
        await connection.closed


async def _httpx_client(
    http: httpx.AsyncClient, sim: SimulatedClient, deadline: float, errors: dict[str, int]
) -> None:
    k = 0
    while time.monotonic() < deadline:
        index = k % len(sim.bodies)
        k += 1
        started = time.perf_counter()
        try:
            response = await http.post(
                INFER_PATH, content=sim.bodies[index], headers={KEY_HEADER: sim.key_id}
            )
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        if response.status_code == 200:
            sim.latencies.append((time.perf_counter() - started) * 1e3)
            sim.last = (index, response.content)
        else:
            errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1


async def _drive(
    url: str, clients: list[SimulatedClient], duration: float, loadgen: str
) -> tuple[float, dict[str, int]]:
    errors: dict[str, int] = {}
    deadline = time.monotonic() + duration
    started = time.monotonic()
    if loadgen == "raw":
        await asyncio.gather(*(_raw_client(url, c, deadline, errors) for c in clients))
    else:
        limits = httpx.Limits(max_connections=len(clients) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            await asyncio.gather(*(_httpx_client(http, c, deadline, errors) for c in clients))
    return time.monotonic() - started, errors


def _verify(clients: list[SimulatedClient]) -> dict[str, int]:
    """Decrypt each client's latest answer (outside the timed window) and check the argmax."""
    checked = agreed = 0
    for sim in clients:
        if sim.last is None:
            continue
        index, payload = sim.last
        scores = sim.client.decrypt(payload)
        checked += len(scores)
        agreed += int((scores.argmax(axis=1) == sim.expected[index]).sum())
    return {"images_checked": checked, "images_agreeing": agreed}


# Run in a fresh interpreter with one checkout's `src` first on the path, so that each side of an
# A/B is timed with its own `heinfer.Client`, called as a new user calls it.
_PREDICT_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import heinfer
url, calls, warmup = sys.argv[2], int(sys.argv[4]), int(sys.argv[5])
data = np.load(sys.argv[3])
X, expected = data["X"], data["expected"]
with heinfer.Client(url, model="mnist") as client:
    for i in range(warmup):
        client.predict(X[i % len(X)])
    latencies, cpu, agreeing = [], [], 0
    for i in range(calls):
        wall, own = time.perf_counter(), time.process_time()
        scores = client.predict(X[i % len(X)])
        latencies.append((time.perf_counter() - wall) * 1e3)
        cpu.append((time.process_time() - own) * 1e3)
        agreeing += int(scores.shape == (1, 10) and scores[0].argmax() == expected[i % len(X)])
    client.delete_keys()
print(json.dumps({"latencies_ms": latencies, "client_cpu_ms": cpu, "agreeing": agreeing}))
"""


def predict_latency(
    url: str, src: Path, data: tuple[np.ndarray, np.ndarray], calls: int, warmup: int = 10
) -> dict[str, Any]:
    """`heinfer.Client(url).predict(one image)` end to end (encrypt, HTTP, decrypt), `calls`
    times in a row after `warmup` calls (the first uploads the key), with the client of the
    code in `src`; every answer's argmax is checked against the plaintext model."""
    X, reference = data
    digits = RESULTS / "predict-digits.npz"
    np.savez(digits, X=X[:64], expected=reference[:64].argmax(axis=1))
    out = subprocess.run(
        [sys.executable, "-c", _PREDICT_SCRIPT, str(src), url, str(digits), str(calls),
         str(warmup)],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    latencies, cpu = np.asarray(found["latencies_ms"]), np.asarray(found["client_cpu_ms"])
    return {
        "calls": calls,
        "latencies_ms": [round(float(v), 3) for v in latencies],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "client_cpu_ms_p50": float(np.percentile(cpu, 50)),
        "images_checked": calls,
        "images_agreeing": int(found["agreeing"]),
    }


def _print_predict(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label}: Client.predict(one image) p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, "
        f"client CPU p50 {r['client_cpu_ms_p50']:.2f} ms over {r['calls']} calls; argmax "
        f"{r['images_agreeing']}/{r['images_checked']}",
        flush=True,
    )


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """On uvloop where installed (uvicorn[standard] brings it): the load generator then costs
    about 0.10 ms of CPU per request instead of 0.16-0.20 ms on asyncio's loop (measured here),
    CPU that on a 2-core machine is taken from the service under test."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        return asyncio.run(main)
    return uvloop.run(main)


def _run_level(
    service: Service | RayReplicas,
    clients: list[SimulatedClient],
    duration: float,
    loadgen: str,
    images: int,
) -> dict[str, Any]:
    pid = service.process.pid
    workers = _children(pid)
    for sim in clients:
        sim.latencies.clear()
        sim.last = None
    front0 = _cpu_seconds(pid)
    workers0 = sum(_cpu_seconds(w) for w in workers)
    own0 = time.process_time()
    elapsed, errors = _run_loop(_drive(service.url, clients, duration, loadgen))
    own = time.process_time() - own0
    front = _cpu_seconds(pid) - front0
    worker_cpu = sum(_cpu_seconds(w) for w in workers) - workers0
    latencies = [v for sim in clients for v in sim.latencies]
    count = max(1, len(latencies))
    values = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "clients": len(clients),
        "seconds": elapsed,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "images_per_s": len(latencies) * images / elapsed,
        "p50_ms": float(np.percentile(values, 50)),
        "p95_ms": float(np.percentile(values, 95)),
        "p99_ms": float(np.percentile(values, 99)),
        "errors": errors,
        # (Ray replicas run in Ray's own processes: only the load generator is measured there)
        "cpu_ms_per_request": {
            "http_process": front / count * 1e3 if workers else float("nan"),
            "workers": worker_cpu / count * 1e3 if workers else float("nan"),
            "load_generator": own / count * 1e3,
        },
        **_verify(clients),
    }


def measure_level(
    service: Service | RayReplicas,
    clients: list[SimulatedClient],
    seconds: float,
    warmup: float,
    loadgen: str = "raw",
    images: int = 1,
) -> dict[str, Any]:
    """`_run_level` after `warmup` seconds of the same load, which are not counted: queues,
    connections and caches reach their steady state first."""
    _run_level(service, clients, warmup, loadgen, images)
    return _run_level(service, clients, seconds, loadgen, images)


class RayReplicas:
    """`heinfer serve --ray` with two single-worker replicas (one per node) on the two-node
    loopback cluster of .ci/services/ray.sh; requests go through Serve's HTTP proxy."""

    def __init__(self, model_path: Path, env: dict[str, str]) -> None:
        import subprocess
        import tempfile

        host, port = env["HEINFER_TEST_RAY_HTTP"].rsplit(":", 1)
        self.url = f"http://{host}:{port}"
        self._keys = tempfile.TemporaryDirectory(prefix="heinfer-bench-ray-")
        self._log = open(Path(self._keys.name) / "serve.log", "wb")  # noqa: SIM115
        child_env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": env["HEINFER_TEST_RAY_TOKEN_PATH"],
            "HEINFER_RAY_MIN_REPLICAS": "2",
            "HEINFER_RAY_MAX_REPLICAS": "2",
            "HEINFER_RAY_MAX_REPLICAS_PER_NODE": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "heinfer", "serve", str(model_path), "--key-store",
             str(Path(self._keys.name) / "keys"), "--ray", env["HEINFER_TEST_RAY_ADDRESS"],
             "--host", host, "--port", port, "--workers", "1", "--log-level", "warning",
             "--sample-budget", "0"],  # millions of samples under one tenant: no budget
            env=child_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_ready(
            self.url, self.process, 180, f"heinfer serve --ray (log: {self._keys.name}/serve.log)"
        )

    def stop(self) -> None:
        import signal

        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=90)
        self._log.close()
        self._keys.cleanup()


def _ray_cluster() -> dict[str, str]:
    """Start (or find) the two-node loopback cluster and return its `export` variables."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / ".ci" / "services" / "ray.sh"
    out = subprocess.run(
        ["bash", str(script), "start"], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    found = {}
    for line in out.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            found[name] = value.strip("'\"")
    return found


def _evaluate_for(model_path: str, work: list[tuple[bytes, bytes]], seconds: float) -> int:
    """Evaluations one process completes in `seconds` (no HTTP, no pool: SEAL only), cycling
    through (key, request) pairs of different tenants as the service's workers do."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # as in the service's workers
    plan = linear_plan(heinfer.load_model(model_path))
    server = rowpack_server(plan)
    pairs = [(plan.context.load_evaluation_key(key), record) for key, record in work]
    server.evaluate_record(pairs[0][1], pairs[0][0])  # warm
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        key, record = pairs[done % len(pairs)]
        server.evaluate_record(record, key)
        done += 1
    return done


def ceiling_work(model_path: Path, X: np.ndarray, tenants: int) -> list[tuple[bytes, bytes]]:
    """(public key, request) of `tenants` different clients, for `compute_ceiling`."""
    codec = LinearCodec(heinfer.load_model(model_path).manifest)
    client = rowpack_client(codec)
    work = []
    for i in range(tenants):
        secret = SecretKey.generate(codec.context)
        work.append((secret.public_key_bytes(), client.encrypt_records(secret, X[i : i + 1])[0]))
    return work


def compute_ceiling(
    model_path: Path, work: list[tuple[bytes, bytes]], processes: list[int], seconds: float
) -> dict[int, float]:
    """Evaluations/s of 1..N independent processes with no service around them, each cycling
    through the tenants' keys of `work`: the most any serving layer could get from these cores
    (shared caches and memory bandwidth included). Measured in every round, beside the
    service, because this VM's own 2-process scaling drifts (1.76-2.25x seen)."""
    import concurrent.futures
    import multiprocessing

    rates = {}
    for count in processes:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(count, mp_context=context) as pool:
            jobs = [
                pool.submit(_evaluate_for, str(model_path), work, seconds) for _ in range(count)
            ]
            rates[count] = sum(job.result() for job in jobs) / seconds
        print(
            f"compute only, {count} process(es), {len(work)} keys: {rates[count]:.1f} "
            "evaluations/s",
            flush=True,
        )
    return rates


def _service_cpus(workers: int, options: argparse.Namespace) -> set[int] | None:
    """With --pin, the first `workers` CPUs this process may use; else no confinement."""
    return set(sorted(os.sched_getaffinity(0))[:workers]) if options.pin else None


def run(
    workers: int,
    levels: list[int],
    duration: float,
    model_path: Path,
    data: tuple[np.ndarray, np.ndarray],
    options: argparse.Namespace,
    ray_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    cpus = _service_cpus(workers, options)
    service: Service | RayReplicas = (
        Service(model_path, workers, cpus) if ray_env is None else RayReplicas(model_path, ray_env)
    )
    label = f"workers={workers}" if ray_env is None else "ray replicas=2"
    if cpus:
        label += f" (service on CPUs {sorted(cpus)})"
    try:
        X, reference = data
        clients = _prepare_clients(
            service.url, max(levels), X, reference, options.batch, options.images_per_request
        )
        images = clients[0].client.batch_capacity if options.batch else options.images_per_request
        results = []
        for level in levels:
            results.append(
                measure_level(
                    service, clients[:level], duration, min(3.0, duration), options.loadgen, images
                )
            )
            r = results[-1]
            cpu = r["cpu_ms_per_request"]
            print(
                f"{label} clients={level}: {r['requests_per_s']:.1f} req/s "
                f"({r['images_per_s']:.0f} images/s), p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, CPU ms/request: http "
                f"{cpu['http_process']:.2f}, workers {cpu['workers']:.2f}, load generator "
                f"{cpu['load_generator']:.2f}; argmax {r['images_agreeing']}/{r['images_checked']}",
                flush=True,
            )
        predict = None
        if options.predict_calls and not options.batch:
            predict = predict_latency(service.url, SRC, data, options.predict_calls)
            _print_predict(label, predict)
        pid = service.process.pid
        memory = {"service_mib": _rss_mib(pid), "worker_mib": [_rss_mib(c) for c in _children(pid)]}
        for sim in clients:
            sim.client.close()
        if ray_env is not None:  # replicas live in Ray's processes, not under this pid
            memory = {}
        return {
            "workers": workers, "ray": ray_env is not None, "levels": results, "memory": memory,
            "predict_one_image": predict,
        }
    finally:
        service.stop()


def build_extensions(checkout: Path) -> None:
    """Compile a checkout's C extensions in place (releases after 9e89053 have them), so that
    its `src` runs as it is, like this checkout's editable install."""
    if (checkout / "setup.py").exists():
        import subprocess

        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=checkout, check=True, stdout=subprocess.DEVNULL,
        )


def _launcher(src: Path) -> tuple[str, ...]:
    """What the interpreter runs in place of `-m heinfer` to serve the package in `src`
    (its spawned workers inherit the path, so they run that code too)."""
    code = f"import sys; sys.path.insert(0, {str(src)!r}); from heinfer.cli import main; main()"
    return ("-c", code)


def interleaved_scaling(
    model_path: Path,
    data: tuple[np.ndarray, np.ndarray],
    options: argparse.Namespace,
) -> dict[str, Any]:
    """A throughput ratio from adjacent windows: both services run at once (the idle one costs
    nothing), and the load alternates between them in short windows, in A B B A order.

    A and B are two worker counts, or with `--against CHECKOUT` the same worker count served
    by two versions of the code: the one in CHECKOUT (A) and this checkout's (B).

    Restarting a service per configuration puts half a minute between the two measurements of
    a ratio, over which this VM's speed drifts by 10-20%; adjacent windows a few seconds apart
    share most of that drift, and the ABBA order cancels a linear trend within a pair."""
    count = max(options.clients)
    if options.against is not None:
        workers = options.workers[-1]
        arms = {
            "A": (workers, _launcher(Path(options.against).resolve() / "src")),
            "B": (workers, _launcher(SRC)),
        }
        models = {"A": checkout_model(Path(options.against).resolve()), "B": model_path}
        sources = {"A": Path(options.against).resolve() / "src", "B": SRC}
        names = {
            "A": f"{options.against} ({workers} workers)",
            "B": f"this checkout ({workers} workers)",
        }
    else:
        base, best = options.workers[0], options.workers[-1]
        arms = {"A": (base, ("-m", "heinfer")), "B": (best, ("-m", "heinfer"))}
        models = {"A": model_path, "B": model_path}
        sources = {"A": SRC, "B": SRC}
        names = {"A": f"{base} workers", "B": f"{best} workers"}
    services: dict[str, Service] = {}
    try:
        for arm, (workers, launcher) in arms.items():
            services[arm] = Service(
                models[arm], workers, _service_cpus(workers, options), launcher=launcher
            )
        X, reference = data
        clients = {
            arm: _prepare_clients(s.url, count, X, reference, False, options.images_per_request)
            for arm, s in services.items()
        }
        windows: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        ratios: list[float] = []
        for index in range(options.pairs):
            for arm in ("A", "B") if index % 2 == 0 else ("B", "A"):
                # the other service's queue has just drained: one second to settle first
                windows[arm].append(
                    measure_level(
                        services[arm], clients[arm], options.pair_seconds, 1.0,
                        options.loadgen, options.images_per_request,
                    )
                )
            low, high = windows["A"][-1]["requests_per_s"], windows["B"][-1]["requests_per_s"]
            ratios.append(high / low)
            print(
                f"pair {index + 1}/{options.pairs}: A {low:.1f} and B {high:.1f} req/s, "
                f"ratio {ratios[-1]:.3f}",
                flush=True,
            )
        single = _single_image_windows(services, clients, sources, data, options)
        for sims in clients.values():
            for sim in sims:
                sim.client.close()
    finally:
        for service in services.values():
            service.stop()
    errors = sum(sum(w["errors"].values()) for runs in windows.values() for w in runs)
    checked = sum(w["images_checked"] for runs in windows.values() for w in runs)
    agreeing = sum(w["images_agreeing"] for runs in windows.values() for w in runs)
    q1, median, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    print(
        f"interleaved, clients={count}: B = {names['B']} / A = {names['A']} = {median:.3f}x "
        f"throughput (median of {len(ratios)} pairs of {options.pair_seconds:g} s windows; mean "
        f"{float(np.mean(ratios)):.3f}, quartiles {q1:.3f}-{q3:.3f}, range "
        f"{min(ratios):.3f}-{max(ratios):.3f}); errors {errors}; argmax {agreeing}/{checked}"
    )
    for arm in ("A", "B"):
        cpu = {
            part: float(np.median([w["cpu_ms_per_request"][part] for w in windows[arm]]))
            for part in ("http_process", "workers", "load_generator")
        }
        print(
            f"{arm} = {names[arm]}, {count} clients: service CPU ms/request (median of "
            f"{len(windows[arm])} windows) {cpu['http_process'] + cpu['workers']:.2f} (HTTP "
            f"process {cpu['http_process']:.2f}, workers {cpu['workers']:.2f}); load generator "
            f"{cpu['load_generator']:.2f}",
            flush=True,
        )
        one = single[arm]
        if one["round_trip_p50_ms"]:
            print(
                f"{arm} = {names[arm]}, 1 client: round trip p50 "
                f"{float(np.median(one['round_trip_p50_ms'])):.2f} ms (median of "
                f"{len(one['round_trip_p50_ms'])} windows), service CPU ms/request "
                f"{float(np.median(one['service_cpu_ms'])):.2f}, errors {one['errors']}, argmax "
                f"{one['images_agreeing']}/{one['images_checked']}",
                flush=True,
            )
        if one["predict_one_image"] is not None:
            _print_predict(f"{arm} = {names[arm]}", one["predict_one_image"])
    return {
        "clients": count,
        "arms": names,
        "single_image": single,
        "workers": [arms["A"][0], arms["B"][0]],
        "pinned": options.pin,
        "pair_seconds": options.pair_seconds,
        "ratios": [round(r, 4) for r in ratios],
        "median": median,
        "mean": float(np.mean(ratios)),
        "quartiles": [q1, q3],
        "errors": errors,
        "images_checked": checked,
        "images_agreeing": agreeing,
        "requests_per_s": {
            arm: [round(r["requests_per_s"], 2) for r in runs] for arm, runs in windows.items()
        },
        "cpu_ms_per_request": {
            arm: [r["cpu_ms_per_request"] for r in runs] for arm, runs in windows.items()
        },
    }


def _single_image_windows(
    services: dict[str, Service],
    clients: dict[str, list[SimulatedClient]],
    sources: dict[str, Path],
    data: tuple[np.ndarray, np.ndarray],
    options: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """One client at a time, A B B A: the service's round trip (pre-encrypted bodies, one
    `--pair-seconds` window per arm and turn) and `Client.predict` of one image as a user calls
    it (`--predict-calls` calls per arm in all, an equal share per turn, each arm's own client)."""
    found: dict[str, dict[str, Any]] = {
        arm: {"round_trip_p50_ms": [], "service_cpu_ms": [], "errors": 0, "images_checked": 0,
              "images_agreeing": 0, "predict_one_image": None, "predict_turns": []}
        for arm in ("A", "B")
    }
    if options.single_turns <= 0:
        return found
    for index in range(options.single_turns):
        for arm in ("A", "B") if index % 2 == 0 else ("B", "A"):
            level = measure_level(
                services[arm], clients[arm][:1], options.pair_seconds, 1.0, options.loadgen,
                options.images_per_request,
            )
            one = found[arm]
            one["round_trip_p50_ms"].append(level["p50_ms"])
            cpu = level["cpu_ms_per_request"]
            one["service_cpu_ms"].append(cpu["http_process"] + cpu["workers"])
            one["errors"] += sum(level["errors"].values())
            one["images_checked"] += level["images_checked"]
            one["images_agreeing"] += level["images_agreeing"]
            if options.predict_calls:
                turn = max(1, options.predict_calls // options.single_turns)
                one["predict_turns"].append(
                    predict_latency(services[arm].url, sources[arm], data, turn)
                )
    for one in found.values():
        turns = one["predict_turns"]
        if turns:
            latencies = np.asarray([v for t in turns for v in t["latencies_ms"]])
            one["predict_one_image"] = {
                "calls": len(latencies),
                "p50_ms": float(np.percentile(latencies, 50)),
                "p95_ms": float(np.percentile(latencies, 95)),
                "client_cpu_ms_p50": float(np.median([t["client_cpu_ms_p50"] for t in turns])),
                "images_checked": sum(t["images_checked"] for t in turns),
                "images_agreeing": sum(t["images_agreeing"] for t in turns),
            }
    return found


def _plot(report: list[dict[str, Any]], path: Path, unit: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_ in report:
        clients = [lv["clients"] for lv in run_["levels"]]
        label = "2 Ray replicas" if run_.get("ray") else f"{run_['workers']} worker(s)"
        axes[0].plot(clients, [lv["images_per_s"] for lv in run_["levels"]], "o-", label=label)
        axes[1].plot(clients, [lv["p99_ms"] for lv in run_["levels"]], "o-", label=f"{label} p99")
        axes[1].plot(clients, [lv["p50_ms"] for lv in run_["levels"]], "x--", label=f"{label} p50")
    axes[0].set_xlabel("concurrent clients")
    axes[0].set_ylabel(f"images/s ({unit})")
    axes[1].set_xlabel("concurrent clients")
    axes[1].set_ylabel("latency (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _scaling(rounds: list[list[dict[str, Any]]]) -> dict[int, list[float]]:
    """Throughput of the last worker count over the first, per client level and round."""
    ratios: dict[int, list[float]] = {}
    if len(rounds[0]) < 2:
        return ratios
    for runs in rounds:
        base, best = runs[0], runs[-1]
        for lv_base, lv_best in zip(base["levels"], best["levels"], strict=True):
            ratio = lv_best["images_per_s"] / lv_base["images_per_s"]
            ratios.setdefault(lv_base["clients"], []).append(round(ratio, 3))
    base_workers, best_workers = rounds[0][0]["workers"], rounds[0][-1]["workers"]
    for clients, values in ratios.items():
        spread = f" (median of {len(values)} rounds: {', '.join(f'{v:.2f}' for v in values)})"
        print(
            f"clients={clients}: {best_workers} workers / {base_workers} = "
            f"{float(np.median(values)):.2f}x throughput{spread if len(values) > 1 else ''}"
        )
    return ratios


def mnist_model() -> tuple[Path, np.ndarray, np.ndarray]:
    """The MNIST logistic regression compiled for serving, the test digits and their
    plaintext scores."""
    from sklearn.linear_model import LogisticRegression

    import _mnist

    RESULTS.mkdir(parents=True, exist_ok=True)
    fitted = _mnist.model()
    X, _ = _mnist.load("test")
    estimator = LogisticRegression()
    estimator.coef_, estimator.intercept_, estimator.classes_ = fitted.W, fitted.b, np.arange(10)
    model_path = heinfer.compile(estimator, name="mnist", input_range=(0.0, 1.0)).save(
        RESULTS / "mnist-load.heinfer"
    )
    return model_path, X, X @ fitted.W.T + fitted.b


def checkout_model(checkout: Path) -> Path:
    """The benchmark's model as the code in `checkout` compiles it: an older release may not
    read this checkout's model format (8bbfa1e reads format 1 only), and each side of an A/B
    should serve what its own compiler writes. Same fitted weights as `mnist_model`."""
    build_extensions(checkout)
    import _mnist

    fitted = _mnist.model()
    weights = RESULTS / "mnist-load-weights.npz"
    np.savez(weights, W=fitted.W, b=fitted.b)
    out = RESULTS / "mnist-load-against.heinfer"
    code = (
        f"import sys; sys.path.insert(0, {str(checkout / 'src')!r})\n"
        "import numpy as np, heinfer\n"
        "from sklearn.linear_model import LogisticRegression\n"
        f"w = np.load({str(weights)!r})\n"
        "e = LogisticRegression()\n"
        "e.coef_, e.intercept_, e.classes_ = w['W'], w['b'], np.arange(10)\n"
        "heinfer.compile(e, name='mnist', input_range=(0.0, 1.0))"
        f".save({str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 2])
    parser.add_argument(
        "--images-per-request", type=int, default=1, help="digits per (per-sample) request"
    )
    parser.add_argument("--loadgen", choices=["raw", "httpx"], default="raw")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="confine the service (HTTP process + workers) to as many CPUs as it has workers, "
        "so that 1 worker means 1 core: scaling per core rather than per worker process",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="also run two Ray Serve replicas on the loopback cluster of .ci/services/ray.sh "
        "(started if needed; `.ci/services/ray.sh stop` stops it)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the worker configurations this many times in alternating order and "
        "report the median scaling ratio",
    )
    parser.add_argument(
        "--batch", action="store_true", help="each request is one full coeff-batch (N images)"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="instead of the levels: the scaling ratio at the top client level from this many "
        "pairs of adjacent windows, both services running at once (see interleaved_scaling)",
    )
    parser.add_argument("--pair-seconds", type=float, default=6.0)
    parser.add_argument(
        "--predict-calls",
        type=int,
        default=200,
        help="Client.predict of one image, end to end as a user calls it, this many times per "
        "service (with --pairs: per arm, spread over the single-image turns); 0: skip",
    )
    parser.add_argument(
        "--single-turns",
        type=int,
        default=4,
        help="with --pairs: turns of one client at a time, A B B A (1-client round trip over "
        "--pair-seconds, then the arm's share of --predict-calls); 0: skip",
    )
    parser.add_argument(
        "--against",
        metavar="CHECKOUT",
        help="with --pairs: instead of two worker counts, the same (last) worker count served "
        "by the code in CHECKOUT (A, e.g. `git worktree add /tmp/before main`) and by this "
        "checkout's (B): a paired A/B of two versions",
    )
    args = parser.parse_args()
    model_path, X, reference = mnist_model()
    if args.pairs:
        if args.batch or args.ray or (len(args.workers) < 2 and args.against is None):
            parser.error("--pairs compares two worker counts or two checkouts; it takes no "
                         "--batch or --ray")
        result = interleaved_scaling(model_path, (X, reference), args)
        result["loadavg"] = os.getloadavg()
        name = "load-ab" if args.against else "load-interleaved"
        name += "-pinned" if args.pin else ""
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
        return
    work = None
    if not args.batch and len(args.workers) >= 2:
        work = ceiling_work(model_path, X, max(args.clients))
    ceilings: list[dict[int, float]] = []
    seconds = min(10.0, args.duration)  # per compute-only ceiling measurement
    rounds = []
    for index in range(args.rounds):
        # Alternate the order: on a shared VM the machine's speed drifts over minutes, and a
        # fixed order would hand that drift to one configuration every time.
        order = args.workers if index % 2 == 0 else args.workers[::-1]
        if work is not None:
            ceilings.append(compute_ceiling(model_path, work, sorted(set(args.workers)), seconds))
        runs = {
            w: run(w, args.clients, args.duration, model_path, (X, reference), args)
            for w in order
        }
        rounds.append([runs[w] for w in args.workers])
    report = list(rounds[-1])
    if args.ray:
        cluster = _ray_cluster()
        ray_run = run(1, args.clients, args.duration, model_path, (X, reference), args, cluster)
        for lv_base, lv_ray in zip(report[0]["levels"], ray_run["levels"], strict=True):
            print(
                f"clients={lv_base['clients']}: 2 Ray replicas / {report[0]['workers']} worker = "
                f"{lv_ray['images_per_s'] / lv_base['images_per_s']:.2f}x throughput"
            )
        report.append(ray_run)
    ratios = _scaling(rounds)
    machine = []
    if ratios and ceilings:
        base, best = args.workers[0], args.workers[-1]
        machine = [round(c[best] / c[base], 3) for c in ceilings]
        listed = ", ".join(f"{v:.2f}" for v in machine)
        print(
            f"compute-only ceiling (no service): {best} processes / {base} = "
            f"{float(np.median(machine)):.2f}x (per round: {listed})"
        )
    out = {
        "loadavg": os.getloadavg(),
        "cpus": os.cpu_count(),
        "batch": args.batch,
        "images_per_request": args.images_per_request,
        "loadgen": args.loadgen,
        "pinned": args.pin,
        "compute_only_evaluations_per_s_per_round": ceilings,
        "compute_only_scaling_per_round": machine,
        "scaling_per_round": ratios,
        "rounds": rounds,
        "runs": report,
    }
    if args.batch:
        name, unit = "load-batch", "coeff-batch requests"
    else:
        name = "load" if args.images_per_request == 1 else f"load-x{args.images_per_request}"
        unit = f"{args.images_per_request} per request"
    if args.loadgen != "raw":
        name += f"-{args.loadgen}"
    if args.pin:
        name += "-pinned"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    _plot(report, RESULTS / f"{name}.png", unit)


if __name__ == "__main__":
    main()
