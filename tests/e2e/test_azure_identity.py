"""The Azure key store with a managed identity instead of a connection string, for real.

Azure ML online endpoints (deploy/azureml/) give the container a managed identity through an
MSI endpoint: MSI_ENDPOINT and MSI_SECRET in the environment, a GET that answers an OAuth
access token for a resource. Here that endpoint is a small local HTTP server speaking the same
protocol (it is the cloud's side, which no test can reach), azure-identity's
DefaultAzureCredential finds it exactly as it would on Azure ML, and Azurite — over HTTPS with
a certificate made for this test, `--oauth basic` — checks every bearer token's issuer,
audience and lifetime. A negative control gets tokens for the wrong audience refused.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import heinfer
from heinfer.server.auth import PUBLIC_TENANT
from service_helpers import RunningService
from storage_fixtures import start_azurite, stop_azurite, unique_store_name

pytestmark = [pytest.mark.e2e, pytest.mark.azure]

pytest.importorskip("azure.identity")
STORAGE = "https://storage.azure.com"
# Variables that would make azure-identity pick another credential than the managed identity.
_OTHER_IDENTITY_ENV = (
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT", "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_USERNAME",
)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (made now, never committed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class MsiEndpoint:
    """Azure ML's managed identity endpoint protocol (api-version 2017-09-01) on loopback."""

    def __init__(self, audience: str = STORAGE) -> None:
        self.secret = uuid.uuid4().hex
        self.audience = audience
        self.requests: list[str] = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.requests.append(self.path)
                if self.headers.get("secret") != endpoint.secret or "resource=" not in self.path:
                    self.send_response(400)
                    self.end_headers()
                    return
                now = int(time.time())
                claims = {"aud": endpoint.audience, "iss": "https://sts.windows.net/heinfer-test/",
                          "nbf": now - 60, "iat": now - 60, "exp": now + 3600,
                          "oid": str(uuid.uuid4())}
                token = ".".join((_b64({"alg": "RS256", "typ": "JWT"}), _b64(claims), "c2ln"))
                body = json.dumps({"access_token": token, "expires_on": now + 3600,
                                   "resource": STORAGE, "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/msi/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {"MSI_ENDPOINT": self.url, "MSI_SECRET": self.secret}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def azurite_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A private Azurite on HTTPS with OAuth: (account URL, CA certificate)."""
    state = tmp_path_factory.mktemp("azurite-https")
    cert, key = _self_signed(state)
    server = start_azurite(state / "s", AZURITE_CERT=str(cert), AZURITE_KEY=str(key))
    try:
        yield server.blob_endpoint, cert
    finally:
        stop_azurite(state / "s", wipe=True)


def _identity_env(monkeypatch: pytest.MonkeyPatch, account_url: str, cert: Path,
                  msi: MsiEndpoint) -> dict[str, str]:
    for name in _OTHER_IDENTITY_ENV:
        monkeypatch.delenv(name, raising=False)
    env = {"AZURE_STORAGE_ACCOUNT_URL": account_url, "REQUESTS_CA_BUNDLE": str(cert),
           **msi.env()}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_managed_identity_uploads_and_uses_a_key(
    azurite_https: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
    mnist_model_path: Path, mnist: dict[str, np.ndarray],
    mnist_model: heinfer.EncryptedModel,
) -> None:
    account_url, cert = azurite_https
    msi = MsiEndpoint()
    container = unique_store_name()
    try:
        env = _identity_env(monkeypatch, account_url, cert, msi)
        service = RunningService(
            [str(mnist_model_path), "--workers", "1", "--key-store", f"azure://{container}",
             "--log-level", "warning"],
            env={k: v for k, v in os.environ.items() if k not in _OTHER_IDENTITY_ENV} | env,
        )
        try:
            ready = httpx.get(f"{service.url}/v2/health/ready").json()
            assert ready["key_store"] is True, ready
            with heinfer.Client(service.url, model="mnist") as client:
                key_id = client.upload_keys()
                X = mnist["X_test"][:5]
                scores = client.predict(X)
            assert (scores.argmax(1) == mnist_model.predict_plain(X).argmax(1)).all()
        finally:
            service.stop()
        assert msi.requests and all("resource=" in r for r in msi.requests)

        # The key really is a blob in the container, read here with the same identity.
        from azure.identity import DefaultAzureCredential
        from azure.storage.blob import BlobServiceClient

        with DefaultAzureCredential() as credential, BlobServiceClient(
            account_url, credential=credential
        ) as blobs:
            names = [b.name for b in blobs.get_container_client(container).list_blobs()]
        assert names == [f"{PUBLIC_TENANT}/{key_id}"], names
    finally:
        msi.close()


def test_tokens_for_another_audience_are_refused(
    azurite_https: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: the same path with a token Azurite must refuse fails as "store
    unavailable" (503 for the service), so the test above passing means the token was used."""
    from heinfer.errors import StoreUnavailableError
    from heinfer.server.keystore.azure import AzureKeyStore

    account_url, cert = azurite_https
    msi = MsiEndpoint(audience="https://vault.azure.net")
    try:
        _identity_env(monkeypatch, account_url, cert, msi)
        store = AzureKeyStore(unique_store_name())
        try:
            with pytest.raises(StoreUnavailableError, match="credentials"):
                store.check()
        finally:
            store.close()
        assert msi.requests
    finally:
        msi.close()
