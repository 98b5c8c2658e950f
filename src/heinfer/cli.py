"""`heinfer` command line: demo, serve, predict, train-mnist, inspect, token."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from heinfer.errors import HeinferError

if TYPE_CHECKING:
    from heinfer.server.budget import BudgetRule

__all__ = [
    "app",
    "compile_layout",
    "demo",
    "inspect",
    "main",
    "predict",
    "serve",
    "token_new",
    "token_revoke",
    "train_mnist",
    "wait_ready",
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Encrypted inference: serve scikit-learn models on homomorphically encrypted inputs.",
)
token_app = typer.Typer(help="Manage tenant bearer tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")
console = Console()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "heinfer"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _train_mnist(images: np.ndarray, labels: np.ndarray, out: Path) -> tuple[Path, float]:
    """Logistic regression on pixels / 255, compiled and saved as model `mnist`."""
    from sklearn.linear_model import LogisticRegression

    from heinfer.models import compile as compile_model

    X = images.astype(np.float64) / 255.0
    estimator = LogisticRegression(max_iter=200).fit(X, labels)
    model = compile_model(estimator, name="mnist", input_range=(0.0, 1.0))
    model.save(out)
    return out, float(estimator.score(X, labels))


def _demo_model() -> Path:
    """The demo's model, trained once per model-file and manifest version: a model cached by
    an older release would serve without what this release's manifests state."""
    from heinfer.datasets import load_sample
    from heinfer.models import MODEL_FORMAT_VERSION
    from heinfer.plans.manifest import MANIFEST_VERSION

    name = f"mnist-demo-f{MODEL_FORMAT_VERSION}-m{MANIFEST_VERSION}.heinfer"
    path = _cache_dir() / name
    if not path.exists():
        with console.status("training the demo model on the bundled MNIST sample..."):
            images, labels = load_sample("train")
            _train_mnist(images, labels, path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float = 120.0,
    what: str = "heinfer serve",
) -> None:
    """Poll /v2/health/ready until 200; fail early if the serving process exits.

    Also used by the benchmarks and the tests that start a service of their own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready in {timeout:g} s")


@app.command()
def demo(
    n: Annotated[int, typer.Option("--n", help="bundled test digits to classify")] = 100,
    workers: Annotated[int, typer.Option(help="service worker processes")] = 2,
    batch_size: Annotated[int, typer.Option(help="digits per request")] = 1,
) -> None:
    """The whole workflow on one machine: serve, upload keys, encrypt, infer, decrypt."""
    from heinfer.client import Client
    from heinfer.datasets import load_sample

    model_path = _demo_model()
    images, labels = load_sample("test")
    if not 1 <= n <= len(images):
        raise typer.BadParameter(f"--n must be between 1 and {len(images)}")
    X, y = images[:n].astype(np.float64) / 255.0, labels[:n]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="heinfer-demo-") as keys:
        command = [
            sys.executable,
            "-m",
            "heinfer",
            "serve",
            str(model_path),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--key-store",
            keys,
            "--log-level",
            "warning",
        ]
        process = subprocess.Popen(command)
        try:
            with console.status(f"starting heinfer serve on {url} ..."):
                try:
                    wait_ready(url, process)
                except RuntimeError as exc:
                    console.print(f"[red]demo failed: {exc}[/red]")
                    raise typer.Exit(1) from exc
            _run_demo(Client(url, model="mnist"), X, y, model_path, batch_size)
        finally:
            process.terminate()
            process.wait(timeout=30)


def _run_demo(client: object, X: np.ndarray, y: np.ndarray, model_path: Path, batch: int) -> None:
    from heinfer.client import Client
    from heinfer.models import load_model

    assert isinstance(client, Client)
    reference = load_model(model_path).predict_plain(X)
    started = time.perf_counter()
    client.upload_keys()
    keygen_s = time.perf_counter() - started
    key_bytes = len(client.last_key_upload or b"")
    times = {"encrypt": 0.0, "round trip": 0.0, "decrypt": 0.0}
    scores, request_bytes, response_bytes = [], 0, 0
    with Progress(
        TextColumn("encrypted inference"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("digits", total=len(X))
        for start in range(0, len(X), batch):
            chunk = X[start : start + batch]
            t0 = time.perf_counter()
            body = client.encrypt(chunk)
            t1 = time.perf_counter()
            payload = client.infer(body)
            t2 = time.perf_counter()
            scores.append(client.decrypt(payload))
            t3 = time.perf_counter()
            times["encrypt"] += t1 - t0
            times["round trip"] += t2 - t1
            times["decrypt"] += t3 - t2
            request_bytes += len(body)
            response_bytes += len(payload)
            progress.advance(task, len(chunk))
    decrypted = np.concatenate(scores)
    client.delete_keys()
    n = len(X)
    table = Table(title=f"heinfer demo: {n} encrypted MNIST digits")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy vs labels", f"{(decrypted.argmax(1) == y).mean():.1%}")
    table.add_row(
        "agreement with plaintext model",
        f"{(decrypted.argmax(1) == reference.argmax(1)).mean():.1%}",
    )
    table.add_row("max |score error|", f"{np.abs(decrypted - reference).max():.2e}")
    table.add_row("key generation + upload", f"{keygen_s * 1e3:.0f} ms")
    for stage, seconds in times.items():
        table.add_row(f"{stage} per digit", f"{seconds / n * 1e3:.2f} ms")
    table.add_row("public key uploaded", f"{key_bytes / 1024:.1f} KiB")
    table.add_row("request per digit", f"{request_bytes / n / 1024:.1f} KiB")
    table.add_row("response per digit", f"{response_bytes / n / 1024:.1f} KiB")
    console.print(table)
    if (decrypted.argmax(1) != reference.argmax(1)).any():
        raise typer.Exit(1)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    model_paths: Annotated[list[Path], typer.Argument(help="compiled .heinfer models")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="evaluation processes (default: cores)")] = 0,
    # From the environment too: platforms that run the image's command unchanged (Azure ML
    # online endpoints) configure the key store through environment variables only.
    key_store: Annotated[
        str,
        typer.Option(
            envvar="HEINFER_KEY_STORE", help="DIR, file:///DIR, azure://CONTAINER or s3://BUCKET"
        ),
    ] = "./heinfer-keys",
    auth_file: Annotated[
        Path | None,
        typer.Option(envvar="HEINFER_AUTH_FILE", help="tenant tokens (heinfer token new)"),
    ] = None,
    allow_anonymous: Annotated[
        bool, typer.Option(help="allow no auth on a non-loopback host")
    ] = False,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="largest request body (default 192 MiB)")
    ] = None,
    max_keys_per_tenant: Annotated[
        int | None, typer.Option(help="keys one tenant may hold (default 1000)")
    ] = None,
    max_key_bytes_per_tenant: Annotated[
        int | None, typer.Option(help="key bytes one tenant may hold (default 1 GiB)")
    ] = None,
    max_concurrent_requests: Annotated[
        int | None, typer.Option(help="requests using the workers at once (default 64)")
    ] = None,
    max_queued_requests: Annotated[
        int | None, typer.Option(help="requests waiting beyond those; more get 503 (default 64)")
    ] = None,
    queue_timeout: Annotated[
        float | None, typer.Option(help="seconds a request waits for a worker before 503 (30)")
    ] = None,
    sample_budget: Annotated[
        int | None,
        typer.Option(help="samples one tenant may have evaluated per model per window; 0: no "
                     "limit (default 1,000,000; SECURITY.md, 'Model extraction')"),
    ] = None,
    sample_budget_window: Annotated[
        float | None, typer.Option(help="the sample budget's window in seconds (default 3600)")
    ] = None,
    budget_file: Annotated[
        Path | None,
        typer.Option(help='JSON {"rules": [{"tenant", "model", "samples", "disabled_layouts"}]}: '
                     "budgets and layouts switched off per model and tenant"),
    ] = None,
    log_level: Annotated[str, typer.Option()] = "info",
    page: Annotated[
        bool | None,
        typer.Option(
            "--page/--no-page",
            help="the browser page at / (default: on when HOST is loopback, off elsewhere)",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="run on Ray Serve instead: a cluster HOST:PORT or ray://HOST:PORT, 'auto' "
            "(running local cluster, else start one) or 'local'; needs heinfer[ray]; "
            "replicas: HEINFER_RAY_* (docs/deploy.md)",
        ),
    ] = None,
) -> None:
    """Serve compiled models over HTTP (FastAPI on uvicorn); logs are JSON lines on stderr."""
    import uvicorn

    from heinfer.server.app import create_app, logging_config
    from heinfer.server.auth import TokenRegistry
    from heinfer.server.settings import ServiceSettings

    if auth_file is None and not _is_loopback(host):
        if not allow_anonymous:
            console.print(
                f"[red]refusing to serve on {host} without --auth-file: anyone could upload "
                "keys and use the models. Pass --auth-file, or --allow-anonymous.[/red]"
            )
            raise typer.Exit(2)
        console.print(f"[yellow]warning: serving on {host} without authentication[/yellow]")
    if auth_file is None and sample_budget != 0:
        console.print(
            "[yellow]warning: without --auth-file every caller is the one tenant 'public' and "
            "all share one sample budget, which one caller can use up for everyone "
            "(SECURITY.md, 'Model extraction')[/yellow]"
        )
    if auth_file is not None:
        try:
            tenants = TokenRegistry.from_file(auth_file).tenants
        except HeinferError as exc:
            console.print(f"[red]{exc.message}[/red]")
            raise typer.Exit(2) from exc
        if not tenants:
            console.print(f"[yellow]warning: {auth_file} holds no tenants yet[/yellow]")
    optional: dict[str, int | float | None] = {
        "max_body_bytes": max_body_bytes,
        "max_keys_per_tenant": max_keys_per_tenant,
        "max_key_bytes_per_tenant": max_key_bytes_per_tenant,
        "max_concurrent_requests": max_concurrent_requests,
        "max_queued_requests": max_queued_requests,
        "queue_timeout_seconds": queue_timeout,
        "sample_budget": sample_budget,
        "sample_budget_window_seconds": sample_budget_window,
    }
    rules = _budget_rules(budget_file) if budget_file is not None else []
    settings = ServiceSettings(
        model_paths=[str(p) for p in model_paths],
        host=host,
        port=port,
        workers=workers or (os.cpu_count() or 1),
        key_store=key_store,
        auth_file=str(auth_file) if auth_file else None,
        web_page=page,
        budget_rules=rules,
        **{name: value for name, value in optional.items() if value is not None},  # type: ignore[arg-type]
    )
    if ray is not None:  # same app, replicated by Ray Serve (heinfer.ray_serve)
        try:
            from heinfer.ray_serve import serve_on_ray
        except ImportError as exc:
            console.print(f"[red]--ray needs Ray Serve: pip install 'heinfer[ray]' ({exc})[/red]")
            raise typer.Exit(2) from exc
        serve_on_ray(settings, ray, workers=workers or None, announce=console.print)
        return
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        log_config=logging_config(log_level),
        access_log=False,
        proxy_headers=False,  # nothing uses client addresses: no per-request header rewrite
        http="httptools",
    )


def _budget_rules(path: Path) -> list[BudgetRule]:
    from pydantic import TypeAdapter, ValidationError

    from heinfer.server.budget import BudgetRule

    try:
        document = json.loads(path.read_text())
        return list(TypeAdapter(list[BudgetRule]).validate_python(document["rules"]))
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        console.print(f"[red]cannot read the budget file {path}: {type(exc).__name__}: "
                      f"{str(exc)[:300]}[/red]")
        raise typer.Exit(2) from exc


def _token_from(token_file: Path | None) -> str | None:
    """The bearer token from --token-file, else HEINFER_TOKEN: never from the command line,
    which any local user can read (ps, /proc/PID/cmdline) and shells keep in their history."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {token_file}: {exc.strerror}") from exc
        if not token:
            raise typer.BadParameter(f"{token_file} is empty")
        return token
    return os.environ.get("HEINFER_TOKEN") or None


@app.command()
def predict(
    url: Annotated[str, typer.Option(help="service URL")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option()] = "mnist",
    image: Annotated[Path | None, typer.Option(help="a PNG/JPEG of a digit")] = None,
    mnist_index: Annotated[
        int | None, typer.Option(help="index into the bundled test digits")
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            help=".npy (values as the model expects) or IDX images (pixels, divided by 255)"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="where --batch writes scores (.npy)")] = None,
    batch_size: Annotated[int, typer.Option()] = 256,
    token_file: Annotated[
        Path | None,
        typer.Option(help="file holding the bearer token (default: the HEINFER_TOKEN variable)"),
    ] = None,
    token: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Encrypt inputs, call a running service, decrypt and print the result.

    The bearer token comes from --token-file or HEINFER_TOKEN; a token on the command line is
    refused (it would be visible to every local user in the process list)."""
    from heinfer.client import Client
    from heinfer.datasets import load_image, load_mnist, load_sample

    if token is not None:
        console.print(
            "[red]--token puts the token in the process list, where every local user can read "
            "it: put it in HEINFER_TOKEN or in a file named by --token-file[/red]"
        )
        raise typer.Exit(2)
    bearer = _token_from(token_file)
    if sum(x is not None for x in (image, mnist_index, batch)) != 1:
        raise typer.BadParameter("give exactly one of --image, --mnist-index, --batch")
    if image is not None:
        X = load_image(image).reshape(1, -1)
    elif mnist_index is not None:
        images, _ = load_sample("test")
        X = images[mnist_index : mnist_index + 1].astype(np.float64) / 255.0
    else:
        assert batch is not None
        if batch.suffix == ".npy":
            X = np.load(batch, allow_pickle=False)
        else:
            X = load_mnist(batch)[0].astype(np.float64) / 255.0
    try:
        with Client(url, model=model, token=bearer) as client:
            client.upload_keys()
            with Progress(
                TextColumn("encrypted inference"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                disable=len(X) <= batch_size,
            ) as progress:
                task = progress.add_task("samples", total=len(X))
                scores = client.predict(
                    X, batch_size=batch_size, progress=lambda k: progress.advance(task, k)
                )
            classes = client.manifest.output.classes
            client.delete_keys()
    except HeinferError as exc:
        console.print(f"[red]{exc.code}: {exc.message}[/red]")
        raise typer.Exit(1) from exc
    if batch is not None:
        target = out or batch.with_suffix(".scores.npy")
        np.save(target, scores)
        console.print(f"wrote {scores.shape} scores to {target}")
        return
    row = scores[0]
    if classes is not None and len(row) > 1:
        console.print(f"predicted class: [bold]{classes[int(row.argmax())]}[/bold]")
    console.print("scores: " + ", ".join(f"{v:.4f}" for v in row))


@app.command("train-mnist")
def train_mnist(
    images: Annotated[Path, typer.Option(help="IDX images (.gz or raw)")],
    labels: Annotated[Path, typer.Option(help="IDX labels")],
    out: Annotated[Path, typer.Option(help="model file to write")] = Path("model.heinfer"),
    arch: Annotated[
        str, typer.Option(help="linear (logistic regression), cnn or mlp (square activation)")
    ] = "linear",
    epochs: Annotated[int, typer.Option(help="cnn / mlp training epochs")] = 40,
    test_images: Annotated[Path | None, typer.Option()] = None,
    test_labels: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Train on MNIST (pixels / 255) and compile it as model `mnist` (or `mnist-cnn`,
    `mnist-mlp`)."""
    from heinfer.datasets import load_mnist
    from heinfer.models import load_model

    if arch not in ("linear", "cnn", "mlp"):
        raise typer.BadParameter("--arch must be linear, cnn or mlp")
    X, y = load_mnist(images, labels)
    assert y is not None
    started = time.perf_counter()
    if arch == "linear":
        _, train_accuracy = _train_mnist(X, y, out)
    else:
        train_accuracy = _train_network(X, y, out, epochs, arch)
    console.print(
        f"trained {arch} on {len(X)} digits in {time.perf_counter() - started:.1f} s; "
        f"train accuracy {train_accuracy:.1%}; wrote {out}"
    )
    if test_images is not None and test_labels is not None:
        Xt, yt = load_mnist(test_images, test_labels)
        scores = load_model(out).predict_plain(Xt.astype(np.float64) / 255.0)
        console.print(f"test accuracy {(scores.argmax(1) == yt).mean():.1%} on {len(Xt)} digits")


def _train_network(
    images: np.ndarray, labels: np.ndarray, out: Path, epochs: int, arch: str
) -> float:
    """An HE-friendly CNN or MLP (square activation), compiled to a CKKS plan as model
    `mnist-cnn` / `mnist-mlp`."""
    try:
        from heinfer.nn import he_friendly_mlp, train_mnist_cnn
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise typer.BadParameter(
            f"--arch {arch} needs PyTorch: pip install 'heinfer[cnn]'"
        ) from exc
    from heinfer.models import compile as compile_model

    X = images.astype(np.float64) / 255.0
    with console.status(f"training the {arch.upper()} for {epochs} epochs on {len(X)} digits..."):
        model_in = he_friendly_mlp() if arch == "mlp" else None
        network = train_mnist_cnn(X, labels, epochs=epochs, model=model_in)
    model = compile_model(network, name=f"mnist-{arch}", X=X[:2000])
    model.save(out)
    return float((model.predict_plain(X).argmax(1) == labels).mean())


_LINEAR_LAYOUTS = ("coeff-rowpack", "coeff-packed")


@app.command("compile")
def compile_layout(
    model_path: Annotated[Path, typer.Argument(help="a compiled linear model (.heinfer)")],
    out: Annotated[Path, typer.Option(help="model file to write")],
    layout: Annotated[
        str | None,
        typer.Option(
            help="force this linear layout: coeff-rowpack or coeff-packed "
            "(default: the cost model's pick)"
        ),
    ] = None,
) -> None:
    """Compile a linear model again from its saved weights, with the same input grid, classes
    and name, forcing a layout (`heinfer inspect` then shows it as forced); clients need the
    new manifest and new keys."""
    from heinfer.models import EncryptedModel, load_model
    from heinfer.plans.linear import LinearPlan, compile_linear

    if layout is not None and layout not in _LINEAR_LAYOUTS:
        raise typer.BadParameter(
            f"unknown layout {layout!r}: one of {', '.join(_LINEAR_LAYOUTS)}", param_hint="--layout"
        )
    plan = load_model(model_path).plan
    if not isinstance(plan, LinearPlan):
        raise typer.BadParameter(f"{model_path} is not a linear model: layouts apply to linear "
                                 "models only", param_hint="MODEL_PATH")
    manifest = plan.manifest
    assert manifest.input.bits is not None
    recompiled = compile_linear(
        plan.arrays["coef"],
        plan.arrays["intercept"],
        name=manifest.name,
        task=manifest.task,
        estimator=manifest.estimator,
        classes=manifest.output.classes,
        input_range=(manifest.input.low, manifest.input.high),
        input_bits=manifest.input.bits,
        max_batch=manifest.max_batch,
        input_choice=f"kept from {model_path.name}: {manifest.precision.input_choice or 'fixed'}",
        client_side=manifest.input.client_side,
        layout=layout,
    )
    EncryptedModel(recompiled).save(out)
    choice = recompiled.manifest.layout["choice"]
    how = "forced" if choice["forced"] else "picked by the cost model"
    console.print(f"wrote {out}: layout {choice['picked']} ({how})")


@app.command()
def inspect(
    model_path: Annotated[Path, typer.Argument()],
    summary: Annotated[
        bool, typer.Option(help="only the layout choice and precision, as a table")
    ] = False,
) -> None:
    """Print a compiled model's public manifest, then which linear layout the cost model
    picked and why: per layout key, request and response bytes and estimated server time."""
    from heinfer.models import load_model

    manifest = load_model(model_path).manifest
    if not summary:
        console.print_json(json.dumps(manifest.to_dict()))
    # the summary on stderr: stdout stays the manifest's JSON, for scripts
    notes = Console(stderr=True)
    choice = manifest.layout.get("choice")
    if choice:
        table = Table(title=f"layouts of {manifest.name} ({choice['rule']})")
        columns = ("layout", "keys", "request", "response", "server ms (est.)", "tree", "")
        for column in columns:
            table.add_column(column)
        for kind, cost in choice["options"].items():
            mark = ("forced" if choice["forced"] else "picked") if kind == choice["picked"] else ""
            tree = ""
            if "galois_keys" in cost:
                tree = (
                    f"{cost['galois_keys']} Galois keys, {cost.get('key_switches', '?')} key "
                    f"switches, {cost.get('client_levels', 0)} level(s) on the client"
                )
            table.add_row(
                kind,
                f"{cost['key_bytes']:,} B",
                f"{cost['request_bytes']:,} B",
                f"{cost['response_bytes']:,} B",
                f"{cost['server_ms']:.1f}",
                tree,
                mark,
            )
        notes.print(table)
    precision = manifest.precision
    notes.print(
        f"input: {manifest.input.bits} bits over [{manifest.input.low:g}, {manifest.input.high:g}]"
        f" ({precision.input_choice or 'fixed'}); expected score error from input rounding "
        f"{precision.input_abs_error if precision.input_abs_error is not None else 'n/a'}, "
        f"typical total {precision.expected_abs_error:.3g}, worst {precision.max_abs_error:.3g}"
    )
    if manifest.input.client_side:
        notes.print(f"client-side steps: {', '.join(manifest.input.client_side)}")
    from heinfer.server.budget import repeated_query_lines
    from heinfer.server.settings import ServiceSettings

    defaults = ServiceSettings.model_fields
    samples = int(defaults["sample_budget"].default)
    window = float(defaults["sample_budget_window_seconds"].default)
    for _reachable, line in repeated_query_lines(manifest.name, manifest, samples, window):
        notes.print(f"repeated queries, at heinfer serve's default budget: {line}")
    extraction = manifest.privacy.extraction
    if extraction is None:
        notes.print("extraction: not stated (compiled before manifest version 2)")
    elif extraction.exact:
        notes.print(f"extraction: {extraction.samples} answered samples suffice to recover "
                    f"all {extraction.parameters} parameters")
    else:
        notes.print(f"extraction: {extraction.parameters} parameters; an equation-solving "
                    f"attack needs at least {extraction.samples} answered samples")


@token_app.command("new")
def token_new(
    tenant: Annotated[str, typer.Argument()],
    auth_file: Annotated[Path, typer.Option(help="the file heinfer serve --auth-file reads")],
) -> None:
    """Make a tenant token: printed once, only its hash is stored."""
    from heinfer.server.auth import new_token

    try:
        print(new_token(tenant, auth_file))
    except HeinferError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from exc


@token_app.command("revoke")
def token_revoke(
    tenant: Annotated[str, typer.Argument()],
    auth_file: Annotated[Path, typer.Option(help="the file heinfer serve --auth-file reads")],
) -> None:
    """Remove a tenant's token: a running service refuses it within a second. The tenant's
    keys stay in the key store."""
    from heinfer.server.auth import revoke_token

    try:
        found = revoke_token(tenant, auth_file)
    except HeinferError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from exc
    if not found:
        console.print(f"[red]{auth_file} holds no tenant {tenant!r}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked the token of {tenant!r}")


def main() -> None:
    app()
