"""TLS and mutual TLS between agent and verifier, with real certificates on loopback."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.client import VerifierClient, open_channel
from agent.settings import AgentSettings
from proto.transport import TransportError
from server.serve import RunningVerifier, start_verifier
from server.settings import VerifierSettings
from server.store import Store


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _issue(
    directory: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    *,
    is_ca: bool = False,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, _, _ = _issue(directory, "test-ca", ca_key, _name("test-ca"), is_ca=True, key=ca_key)
    server_cert, server_key, _ = _issue(directory, "verifier", ca_key, _name("test-ca"))
    client_cert, client_key, _ = _issue(directory, "agent", ca_key, _name("test-ca"))
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key)


async def _verifier(tmp_path: Path, pki: Pki, mutual: bool) -> tuple[RunningVerifier, Store]:
    store = Store.open(f"sqlite:///{tmp_path / 'v.db'}")
    settings = VerifierSettings(
        listen="127.0.0.1:0",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca if mutual else None,
    )
    return await start_verifier(settings, store), store


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
async def tls_verifier(
    request: pytest.FixtureRequest, tmp_path: Path, pki: Pki
) -> AsyncIterator[tuple[RunningVerifier, bool]]:
    running, store = await _verifier(tmp_path, pki, mutual=request.param)
    try:
        yield running, request.param
    finally:
        await running.stop(0)
        store.close()


async def _results_call(settings: AgentSettings) -> int:
    async with open_channel(settings.config()) as channel:
        response = await VerifierClient(channel, timeout_s=5).list_windows()
        return len(response.windows)


async def test_agent_reaches_verifier_over_tls(
    tls_verifier: tuple[RunningVerifier, bool], pki: Pki
) -> None:
    running, mutual = tls_verifier
    settings = AgentSettings(
        verifier=f"localhost:{running.port}",
        tls_ca=pki.ca,
        tls_cert=pki.client_cert if mutual else None,
        tls_key=pki.client_key if mutual else None,
    )
    assert await _results_call(settings) == 0


async def test_mutual_tls_refuses_agent_without_certificate(tmp_path: Path, pki: Pki) -> None:
    running, store = await _verifier(tmp_path, pki, mutual=True)
    try:
        settings = AgentSettings(verifier=f"localhost:{running.port}", tls_ca=pki.ca)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _results_call(settings)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)
        store.close()


async def test_plaintext_client_cannot_talk_to_tls_verifier(
    tls_verifier: tuple[RunningVerifier, bool],
) -> None:
    running, _ = tls_verifier
    settings = AgentSettings(verifier=f"127.0.0.1:{running.port}", insecure_plaintext=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _results_call(settings)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "address", ["10.1.2.3:50051", "verifier.example:443", "0.0.0.0:50051", "[2001:db8::1]:1"]
)
def test_plaintext_off_loopback_is_refused_before_connecting(address: str) -> None:
    with pytest.raises(TransportError, match="loopback"):
        open_channel(AgentSettings(verifier=address, insecure_plaintext=True).config())


async def test_verifier_refuses_plaintext_off_loopback(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'v.db'}")
    try:
        with pytest.raises(TransportError, match="loopback"):
            await start_verifier(
                VerifierSettings(listen="0.0.0.0:0", insecure_plaintext=True), store
            )
    finally:
        store.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (AgentSettings(verifier="127.0.0.1:1"), "tls_ca"),
        (
            AgentSettings(verifier="127.0.0.1:1", tls_ca=Path(__file__), tls_cert=Path(__file__)),
            "both",
        ),
    ],
    ids=["no-tls-no-plaintext", "cert-without-key"],
)
def test_incomplete_agent_tls_settings_are_refused(settings: AgentSettings, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        open_channel(settings.config())
