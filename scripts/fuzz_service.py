#!/usr/bin/env python
"""Long hostile-traffic soak of a real `heinfer serve` (outside CI; loopback only).

Starts a service with two tenants (alice, bob), uploads alice's key, then sends `--requests`
hostile requests (default 100,000) from `--threads` client threads: mutated and random
ciphertext requests and key uploads, wrong models, wrong and foreign key ids, missing and bad
tokens, random routes and methods, and malformed HTTP on raw sockets. Afterwards it checks that
a valid request still decrypts to the plaintext model's scores.

Printed: counts by status and by strategy, throughput, latency of rejections, requests with no
response, service crashes (process exit) and worker restarts (from /metrics), 5xx other than
503, and cross-tenant violations. Exit status 1 on any violation:

* a 5xx other than 503, or a 503 without Retry-After;
* the service process exits, or a worker process restarts;
* a well-formed request that got no response, or one slower than `--hang-seconds`;
* bob (another tenant) gets a 2xx for anything naming alice's key;
* the final valid request fails or decrypts wrongly.

    python scripts/fuzz_service.py                      # 100,000 requests, 8 threads
    python scripts/fuzz_service.py --requests 5000 --threads 4 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import heinfer
from heinfer.datasets import load_sample
from heinfer.server.auth import new_token

UNAVAILABLE_CODES = {"unavailable", "key_store_unavailable"}
INTERESTING_U32 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


# ------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------


def train_model(directory: Path) -> tuple[Path, heinfer.EncryptedModel]:
    from sklearn.linear_model import LogisticRegression

    images, labels = load_sample("train")
    X = images[:1000].astype(np.float64) / 255.0
    estimator = LogisticRegression(max_iter=100).fit(X, labels[:1000])
    model = heinfer.compile(estimator, name="mnist", input_range=(0.0, 1.0))
    return model.save(directory / "mnist.heinfer"), model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(model: Path, work: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable, "-m", "heinfer", "serve", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(workers), "--key-store", str(work / "keys"),
        "--auth-file", str(work / "tokens.json"), "--max-body-bytes", "2000000",
        "--log-level", "warning",
    ]
    log = open(work / "service.log", "wb")  # noqa: SIM115 - lives as long as the service
    env = {**os.environ, "HEINFER_MAX_KEY_BYTES": "200000"}
    process = subprocess.Popen(command, stderr=log, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"service exited at start-up; see {work / 'service.log'}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200:
                return process, url
        time.sleep(0.2)
    raise SystemExit("service did not become ready")


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[name] = float(value)
    return found


# ------------------------------------------------------------------------------------------
# Hostile requests
# ------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    port: int
    tokens: dict[str, str]
    alice_key: str
    request: bytes  # valid, for alice's key
    batch: bytes  # valid, 3 records
    upload: bytes  # valid key upload (another secret key, so never alice's bytes)


def mutate(rng: random.Random, seed: bytes, others: list[bytes]) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        size = len(data)
        pos = rng.randint(0, min(size, 80)) if rng.random() < 0.6 else rng.randint(0, size)
        op = rng.choice(
            ["flip", "byte", "u32", "truncate", "extend", "insert", "delete", "dup", "splice"]
        )
        if op == "flip" and size:
            data[min(pos, size - 1)] ^= 1 << rng.randrange(8)
        elif op == "byte" and size:
            data[min(pos, size - 1)] = rng.randrange(256)
        elif op == "u32" and size >= 4:
            pos = min(pos, size - 4)
            value = rng.choice([*INTERESTING_U32, size, size + 1, max(0, size - pos - 4)])
            data[pos : pos + 4] = struct.pack("<I", value % (1 << 32))
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += rng.randbytes(rng.randint(1, 64))
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del data[pos : pos + rng.randint(1, 64)]
        elif op == "dup" and size:
            data[pos:pos] = data[pos : pos + rng.randint(1, 256)]
        elif op == "splice":
            other = rng.choice(others)
            cut = rng.randint(0, len(other))
            data[pos:] = other[cut:]
    return bytes(data)


def hostile_text(rng: random.Random, size: int = 40) -> str:
    return "".join(chr(rng.randint(0x21, 0x7E)) for _ in range(rng.randint(1, size)))


@dataclass
class Planned:
    strategy: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    bob_on_alice: bool = False
    half_close: bool = False


def plan_request(rng: random.Random, c: Corpus) -> Planned:
    roll = rng.random()
    who = rng.choices(["alice", "bob", "garbage", "none"], weights=[6, 2, 1, 1])[0]
    headers: dict[str, str] = {}
    if who in c.tokens:
        headers["Authorization"] = f"Bearer {c.tokens[who]}"
    elif who == "garbage":
        headers["Authorization"] = rng.choice(["Bearer ", "Basic ", ""]) + hostile_text(rng, 80)
    bodies = [c.request, c.batch, c.upload]
    if roll < 0.45:
        strategy = "infer"
        key = rng.choice(["alice"] * 4 + ["random", "text", "none"])
        if key == "alice":
            headers["X-Heinfer-Key-Id"] = c.alice_key
        elif key == "random":
            headers["X-Heinfer-Key-Id"] = rng.randbytes(32).hex()
        elif key == "text":
            headers["X-Heinfer-Key-Id"] = hostile_text(rng, 100)
        pick = rng.random()
        if pick < 0.75:
            body = mutate(rng, rng.choice([c.request, c.batch]), bodies)
        elif pick < 0.85:
            body = rng.randbytes(rng.randint(0, 4096))
        elif pick < 0.9:
            magic = rng.choice([b"HEQ1", b"HEB1"])  # per-sample and coeff-batch frames
            body = magic + struct.pack("<I", rng.choice(INTERESTING_U32)) + rng.randbytes(64)
        elif pick < 0.95:
            body = b"HEB1" + mutate(rng, c.request, bodies)[4:]  # wrong frame for the bytes
        else:
            body = c.upload if rng.random() < 0.5 else c.request[:-1]
        model = "mnist" if rng.random() < 0.9 else rng.choice(["nope", "MNIST", "mnist2", "..",
                                                               hostile_text(rng, 20)])
        path = f"/v2/models/{_quote(model)}/infer"
        planned = Planned(strategy, "POST", path, headers, body)
        planned.bob_on_alice = who == "bob" and key == "alice"
        return planned
    if roll < 0.70:
        strategy = "upload"
        pick = rng.random()
        if pick < 0.8:
            body = mutate(rng, c.upload, bodies)
        elif pick < 0.9:
            body = rng.randbytes(rng.randint(0, 4096))
        else:
            body = c.request
        model = "mnist" if rng.random() < 0.9 else hostile_text(rng, 20)
        return Planned(strategy, "POST", f"/v2/keys?model={_quote(model)}", headers, body)
    if roll < 0.80:
        strategy = "keys"
        method = rng.choice(["GET", "GET", "DELETE", "HEAD"])
        target = rng.choice(["alice", "random", "text", "list"])
        if target == "list":
            path = "/v2/keys"
        else:
            key_id = {"alice": c.alice_key, "random": rng.randbytes(32).hex(),
                      "text": _quote(hostile_text(rng, 100))}[target]
            path = f"/v2/keys/{key_id}"
        if method == "DELETE" and who == "alice" and target == "alice":
            headers["Authorization"] = f"Bearer {c.tokens['bob']}"  # alice keeps her key
            who = "bob"
        planned = Planned(strategy, method, path, headers, b"")
        planned.bob_on_alice = who == "bob" and target == "alice"
        return planned
    if roll < 0.90:
        method = rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
        path = rng.choice([
            "/", "/v2", "/v2/models", "/v2/models/mnist", "/v2/health/ready", "/metrics",
            "/openapi.json", "/docs", "/v2/keys/", "/v2/models/mnist/infer/",
            "/" + _quote(hostile_text(rng, 200)), "/v2/models/" + _quote(hostile_text(rng)),
            "/v2/keys?model=mnist&model=" + _quote(hostile_text(rng)),
            "/v2/models/mnist/infer?" + _quote(hostile_text(rng)) + "=1",
        ])
        for name in rng.sample(["Content-Type", "X-Request-Id", "Accept", "Expect",
                                "Content-Encoding", "X-Heinfer-Key-Id", "Range"],
                               rng.randint(0, 3)):
            headers[name] = hostile_text(rng)
        body = rng.randbytes(rng.randint(0, 512)) if method in ("POST", "PUT", "PATCH") else b""
        return Planned("random-route", method, path, headers, body)
    payload, half_close = raw_payload(rng, c)
    return Planned("raw-http", "", "", {}, payload, half_close=half_close)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def raw_payload(rng: random.Random, c: Corpus) -> tuple[bytes, bool]:
    """Malformed or abusive HTTP/1.1 bytes, and whether the client half-closes after them.

    Requests that parse ask for `Connection: close`, so a reply is always followed by EOF;
    garbage and the "declared more than sent" case half-close (a client that gives up).
    """
    auth = b"Authorization: Bearer " + c.tokens["alice"].encode() + b"\r\n"
    key = b"X-Heinfer-Key-Id: " + c.alice_key.encode() + b"\r\n"
    infer = b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + key
    get = b"GET /v2/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    choice = rng.randrange(12)
    if choice == 0:
        return rng.randbytes(rng.randint(1, 300)), True
    if choice == 1:
        declared = str(rng.randint(3_000_000, 10**12)).encode()
        return infer + b"Content-Length: " + declared + b"\r\n\r\n", False
    if choice == 2:  # declared more than sent, then give up
        return infer + b"Content-Length: 100000\r\n\r\n" + c.request[: rng.randint(0, 5000)], True
    if choice == 3:
        return infer + b"Transfer-Encoding: chunked\r\n\r\n" + rng.choice(
            [b"zz\r\n", b"fffffffffffffffff\r\nab\r\n", b"5\r\nHEQ1\x01\r\n0\r\n\r\n",
             b"-1\r\n\r\n"]), False
    if choice == 4:
        return infer + b"Content-Length: 5\r\nContent-Length: 9\r\n\r\nHEQ1\x00", False
    if choice == 5:
        return get + b"X-Big: " + b"a" * rng.randint(1000, 200_000) + b"\r\n\r\n", False
    if choice == 6:
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        return live * rng.randint(1, 30) + get + b"\r\n", False
    if choice == 7:
        many = b"".join(b"X-%d: y\r\n" % i for i in range(rng.randint(100, 3000)))
        return get + many + b"\r\n", False
    if choice == 8:
        return bytes(rng.randrange(256) for _ in range(8)) + b" / HTTP/1.1\r\n\r\n", True
    if choice == 9:
        body = mutate(rng, c.request, [c.upload])
        return infer + b"Content-Length: %d\r\n\r\n" % len(body) + body, False
    if choice == 10:
        return get + b"Authorization: Bearer \xff\x00\xfe\r\n\r\n", False
    return b"POST /v2/keys?model=mnist HTTP/1.0\r\nContent-Length: 4\r\n\r\nHEK1", False


# ------------------------------------------------------------------------------------------
# Sending and tallying
# ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    by_strategy: dict[str, collections.Counter[int]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    latencies: list[float] = field(default_factory=list)
    rejections: list[float] = field(default_factory=list)  # 4xx only
    no_response: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    sent: int = 0

    def record(self, strategy: str, status: int | None, seconds: float) -> None:
        """One reply (a pipelined raw request can bring several); None: no reply at all."""
        with self.lock:
            if status is None:
                self.no_response[strategy] += 1
                return
            self.statuses[status] += 1
            self.by_strategy[strategy][status] += 1
            if len(self.latencies) < 200_000:
                self.latencies.append(seconds)
                if 400 <= status < 500 and strategy != "raw-http":
                    self.rejections.append(seconds)

    def violation(self, message: str) -> None:
        with self.lock:
            if len(self.violations) < 50:
                self.violations.append(message)


class Sender:
    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, p: Planned) -> tuple[int, dict[str, str], bytes] | None:
        for attempt in range(2):  # a kept-alive connection the server closed: retry once
            conn = self._connection()
            try:
                conn.request(p.method, p.path, body=p.body, headers=p.headers)
                response = conn.getresponse()
                data = response.read()
                headers = {k.lower(): v for k, v in response.getheaders()}
                if headers.get("connection", "").lower() == "close" or response.will_close:
                    self.close()
                return response.status, headers, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 1:
                    return None
            except (http.client.HTTPException, OSError):
                self.close()
                return None
        return None


def raw_send(port: int, payload: bytes, half_close: bool, timeout: float) -> list[int] | None:
    """Status codes of the replies; None if the server kept the connection open too long."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return None
        except OSError:
            pass
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]


def worker(
    index: int, corpus: Corpus, args: argparse.Namespace, tally: Tally, budget: list[int],
    deadline: float,
) -> None:
    rng = random.Random(args.seed * 1000 + index)
    sender = Sender(corpus.port, args.hang_seconds)
    while time.monotonic() < deadline:
        with tally.lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
            tally.sent += 1
        planned = plan_request(rng, corpus)
        started = time.monotonic()
        if planned.strategy == "raw-http":
            try:
                statuses = raw_send(corpus.port, planned.body, planned.half_close,
                                    args.hang_seconds)
            except OSError as exc:
                tally.violation(f"raw connection failed: {exc!r}")
                statuses = []
            seconds = time.monotonic() - started
            if statuses is None:
                tally.record("raw-http", None, seconds)
                tally.violation(f"raw-http hang: {planned.body[:60]!r}")
                continue
            if not statuses and not planned.half_close:
                tally.violation(f"raw-http got no reply: {planned.body[:60]!r}")
            for status in statuses or [0]:
                tally.record("raw-http", status, seconds)
                if status >= 500 and status != 503:
                    tally.violation(f"raw-http {status} for {planned.body[:60]!r}")
            continue
        result = sender.send(planned)
        seconds = time.monotonic() - started
        if result is None:
            tally.record(planned.strategy, None, seconds)
            tally.violation(f"no response: {planned.method} {planned.path[:80]}")
            continue
        status, headers, data = result
        tally.record(planned.strategy, status, seconds)
        what = f"{planned.method} {planned.path[:80]} -> {status} {data[:120]!r}"
        if seconds > args.hang_seconds:
            tally.violation(f"slow ({seconds:.1f} s): {what}")
        if status >= 500:
            try:
                code = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                code = None
            if status != 503 or "retry-after" not in headers or code not in UNAVAILABLE_CODES:
                tally.violation(f"5xx: {what}")
        if planned.bob_on_alice and 200 <= status < 300:
            tally.violation(f"bob reached alice's key: {what}")
    sender.close()


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="service worker processes")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="heinfer-fuzz-"))
    print(f"work directory: {work}")
    model_path, model = train_model(work)
    tokens = {name: new_token(name, work / "tokens.json") for name in ("alice", "bob")}
    process, url = start_service(model_path, work, args.workers)
    try:
        alice = heinfer.Client(url, model="mnist", token=tokens["alice"])
        alice.upload_keys()
        images, _ = load_sample("test")
        X = images[:3].astype(np.float64) / 255.0
        corpus = Corpus(
            port=int(url.rsplit(":", 1)[1]), tokens=tokens, alice_key=alice.key_id or "",
            request=alice.encrypt(X[:1]), batch=alice.encrypt(X),
            upload=alice.codec.key_upload(alice.codec.keygen()),  # another key pair's upload
        )
        before = metrics(url)
        tally = Tally()
        budget = [args.requests]
        started = time.monotonic()
        deadline = started + args.max_seconds
        threads = [
            threading.Thread(target=worker, args=(i, corpus, args, tally, budget, deadline))
            for i in range(args.threads)
        ]
        for thread in threads:
            thread.start()
        last_print = started
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            if process.poll() is not None:
                tally.violation(f"service exited with {process.returncode}")
                break
            if time.monotonic() - last_print >= 5:
                last_print = time.monotonic()
                rate = tally.sent / (last_print - started)
                print(f"  {tally.sent:>7} sent, {rate:,.0f}/s, {len(tally.violations)} "
                      "violations", flush=True)
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        return report(args, url, process, alice, model, X, tally, before, elapsed)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace, url: str, process: subprocess.Popen[bytes], alice: Any,
    model: heinfer.EncryptedModel, X: np.ndarray, tally: Tally, before: dict[str, float],
    elapsed: float,
) -> int:
    alive = process.poll() is None
    after = metrics(url) if alive else {}
    restarts = after.get("heinfer_worker_restarts", float("nan")) - before.get(
        "heinfer_worker_restarts", 0.0)
    final_ok, final_error = False, 0.0
    if alive:
        try:
            scores = alice.predict(X)
            reference = model.predict_plain(X)
            final_error = float(np.abs(scores - reference).max())
            final_ok = bool((scores.argmax(1) == reference.argmax(1)).all()) and final_error < 1e-3
        except Exception as exc:  # reported as a violation below
            tally.violation(f"final valid request failed: {exc!r}")
    server_5xx = {
        name: value - before.get(name, 0.0) for name, value in after.items()
        if name.startswith("heinfer_requests_total") and re.search(r'status="5\d\d"', name)
    }
    lat = sorted(tally.latencies) or [0.0]
    rej = sorted(tally.rejections) or [0.0]
    samples = after.get("heinfer_samples_total", 0.0) - before.get("heinfer_samples_total", 0.0)
    print()
    print(f"requests sent        {tally.sent:,} in {elapsed:.1f} s "
          f"({tally.sent / max(elapsed, 1e-9):,.0f}/s, {args.threads} threads, seed {args.seed})")
    print(f"responses            {sum(tally.statuses.values()):,} (pipelined raw requests bring "
          "several; 0 = connection closed without a reply, only after garbage or a client "
          "that gave up mid-body)")
    print("responses by status  " + ", ".join(
        f"{s}: {n:,}" for s, n in sorted(tally.statuses.items())))
    for strategy, counts in sorted(tally.by_strategy.items()):
        print(f"  {strategy:<18} " + ", ".join(f"{s}: {n:,}" for s, n in sorted(counts.items())))
    print(f"no response          {sum(tally.no_response.values()):,} {dict(tally.no_response)}")
    print(f"latency (s)          p50 {lat[len(lat) // 2]:.4f}  p99 {lat[int(len(lat) * .99)]:.4f}"
          f"  max {lat[-1]:.3f}")
    print(f"4xx latency (s)      p50 {rej[len(rej) // 2]:.4f}  p99 {rej[int(len(rej) * .99)]:.4f}"
          f"  max {rej[-1]:.3f}  ({len(rej):,} rejections, none reached evaluation)")
    print(f"samples evaluated    {samples:,.0f} (only requests that passed every check)")
    print(f"5xx other than 503   {sum(1 for v in tally.violations if v.startswith('5xx'))}"
          f" (client side); server metrics 5xx: {server_5xx or 'none'}")
    print(f"service alive        {alive} (exit code {process.returncode})")
    print(f"worker restarts      {restarts:g}")
    print(f"final valid request  {'ok' if final_ok else 'FAILED'} (max |error| {final_error:.2e})")
    if not final_ok and alive and not any("final" in v for v in tally.violations):
        tally.violation("final valid request decrypted wrongly")
    if not alive:
        tally.violation("the service died")
    if restarts != 0:
        tally.violation(f"{restarts:g} worker restarts")
    for name, value in server_5xx.items():
        if value and 'status="503"' not in name:
            tally.violation(f"server counted {value:g} x {name}")
    print(f"violations           {len(tally.violations)}")
    for line in tally.violations[:20]:
        print(f"  - {line}")
    return 1 if tally.violations else 0


if __name__ == "__main__":
    sys.exit(main())
