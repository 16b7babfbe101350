"""Forwarding to an upstream over TLS and mutual TLS (`engine run --upstream
https://...` with `--upstream-ca`, `--upstream-cert`/`--upstream-key` and
`--upstream-server-name`).

The upstream is a grpcio server of protos/chat/v1/chat.proto in this
process, serving TLS on 127.0.0.1 (`grpc.ssl_server_credentials`, with
`require_client_auth=True` for mTLS) with certificates of the test PKI of
test_tls.py. The engine runs with empty --protos and --rules, so every call
is forwarded, and is called by a grpcio client on its cleartext listener.

What is checked: unary and server-streaming calls answered by the upstream
over TLS; mTLS with the client certificate (the upstream sees it), without
one and with one from another CA; a server certificate from a CA the engine
does not trust; a certificate for a name only, with and without
`--upstream-server-name`; an upstream that is not TLS or never answers the
handshake. Every failure is UNAVAILABLE naming the upstream, comes within a
bound, and leaves the engine serving. And the start errors: bad TLS flags
make `engine run` exit non-zero with an error naming the flag, URL or file.
"""

from __future__ import annotations

import datetime
import socket
import time
from concurrent import futures
from pathlib import Path

import engine_process
import grpc
import pytest
import test_upstream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_tls import Issued, _key_pem, _name, pki, run_engine_expecting_failure  # noqa: F401 (pki: fixture)
from test_upstream import chat  # noqa: F401 (fixture)

TIMEOUT = 10.0
# A call to an upstream that cannot be reached (refused handshake, wrong
# certificate) must fail within this: the handshake fails at once.
FAIL_BOUND = 4.0
CLIENT_CN = "wirestub test client"


# --------------------------------------------------------------------------
# Certificates beyond test_tls.py's PKI
# --------------------------------------------------------------------------


def issue_for_names(directory: Path, name: str, issuer: Issued, dns: list[str]) -> Issued:
    """A server certificate from `issuer` whose only subject alternative
    names are the DNS names `dns` (no IP address)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(dns[0]))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()), critical=False
        )
        .sign(issuer.private_key, hashes.SHA256())
    )
    cert = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = _key_pem(key, "pkcs8")
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key_pem)
    return Issued(cert, key_pem, cert_path, key_path, certificate, key)


@pytest.fixture(scope="module")
def named_server(pki) -> Issued:
    """A server certificate for `upstream.test` only."""
    return issue_for_names(pki.dir, "upstream-test", pki.ca, ["upstream.test"])


# --------------------------------------------------------------------------
# The TLS upstream
# --------------------------------------------------------------------------


class TlsUpstream:
    """A grpcio Chat server on 127.0.0.1 serving TLS with `server`'s
    certificate; with `client_ca`, it requires a client certificate from
    that CA. It records the client certificate's common name of each call."""

    def __init__(self, chat, server: Issued, client_ca: Issued | None = None, port: int = 0):
        pb, rpc = chat
        self.peers: list[str | None] = []
        outer = self

        class Chat(rpc.ChatServicer):
            def GetRoom(self, request, context):
                auth = context.auth_context()
                assert auth.get("transport_security_type") == [b"ssl"], auth
                cn = auth.get("x509_common_name")
                outer.peers.append(cn[0].decode() if cn else None)
                topic = dict(context.invocation_metadata()).get("x-topic", "none")
                return pb.Room(room=request.room, topic=f"tls upstream: {topic}")

            def Subscribe(self, request, context):
                for i in range(int(request.room.split(":")[1])):
                    yield pb.ChatMessage(user="tls", text=f"m{i}", seq=i)

        credentials = grpc.ssl_server_credentials(
            [(server.key, server.cert)],
            root_certificates=client_ca.cert if client_ca else None,
            require_client_auth=client_ca is not None,
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        rpc.add_ChatServicer_to_server(Chat(), self.server)
        self.port = self.server.add_secure_port(f"127.0.0.1:{port}", credentials)
        assert self.port, "grpcio could not bind its TLS port"
        self.server.start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}"


@pytest.fixture
def serve(chat):
    """Starts TLS upstreams (`serve(server, client_ca=None, port=0)`),
    stopped after the test."""
    started: list[TlsUpstream] = []

    def start(server: Issued, client_ca: Issued | None = None, port: int = 0) -> TlsUpstream:
        up = TlsUpstream(chat, server, client_ca, port)
        started.append(up)
        return up

    yield start
    for up in started:
        up.server.stop(0)


@pytest.fixture(scope="module")
def empty(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty")


@pytest.fixture
def engine(tmp_path_factory, empty):
    """Starts engines forwarding every call to `url` with the extra flags
    (`engine(url, *flags)`); stops them after the test and checks that none
    crashed, exited badly or panicked."""
    started: list[engine_process.EngineProcess] = []

    def start(url: str, *flags: str) -> engine_process.EngineProcess:
        args = ["--protos", str(empty), "--rules", str(empty), "--upstream", url, *flags]
        e = test_upstream.start_engine(tmp_path_factory, "tls", args)
        started.append(e)
        return e

    yield start
    for e in started:
        engine_process.stop_cleanly(e)


# --------------------------------------------------------------------------
# Calls through the engine
# --------------------------------------------------------------------------


def get_room(chat, port: int, room: str = "lobby", timeout: float = TIMEOUT):
    pb, rpc = chat
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        return rpc.ChatStub(ch).GetRoom(pb.GetRoomRequest(room=room), metadata=(("x-topic", "tls"),), timeout=timeout)


def subscribe(chat, port: int, count: int) -> list[tuple[str, int]]:
    pb, rpc = chat
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        call = rpc.ChatStub(ch).Subscribe(pb.SubscribeRequest(room=f"n:{count}"), timeout=TIMEOUT)
        items = [(m.text, m.seq) for m in call]
        assert call.code() == grpc.StatusCode.OK
        return items


def answered(chat, port: int, room: str = "lobby") -> None:
    """A unary call through the engine is the upstream's answer."""
    reply = get_room(chat, port, room)
    assert (reply.room, reply.topic) == (room, "tls upstream: tls")


def unavailable(chat, port: int, url: str, stream: bool = False) -> grpc.RpcError:
    """A call through the engine fails UNAVAILABLE, naming `url`, within
    FAIL_BOUND seconds."""
    pb, rpc = chat
    start = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        s = rpc.ChatStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            if stream:
                list(s.Subscribe(pb.SubscribeRequest(room="n:3"), timeout=TIMEOUT))
            else:
                s.GetRoom(pb.GetRoomRequest(room="lobby"), timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    err = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert url in (err.details() or ""), err.details()
    assert elapsed < FAIL_BOUND, f"the failure took {elapsed:.1f}s: {err.details()}"
    return err


def mtls_flags(pki) -> list[str]:
    """The engine's flags for mutual TLS with the test PKI's upstream."""
    return [
        "--upstream-ca",
        str(pki.ca.cert_path),
        "--upstream-cert",
        str(pki.client.cert_path),
        "--upstream-key",
        str(pki.client.key_path),
    ]


def still_serving(e: engine_process.EngineProcess) -> None:
    """The engine is up and answers its own health service."""
    assert e.alive(), e.log()
    with grpc.insecure_channel(f"127.0.0.1:{e.port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def test_https_upstream_answers_unary_and_server_stream(chat, pki, serve, engine):
    up = serve(pki.server)
    e = engine(up.url(), "--upstream-ca", str(pki.ca.cert_path))
    answered(chat, e.port)
    assert subscribe(chat, e.port, 0) == []
    assert subscribe(chat, e.port, 50) == [(f"m{i}", i) for i in range(50)]
    answered(chat, e.port, "again")
    # No client certificate was asked for or sent.
    assert up.peers == [None, None]


def test_default_server_name_is_the_url_host(chat, pki, serve, engine):
    # The certificate is for localhost and 127.0.0.1: checked by the name
    # in the URL.
    up = serve(pki.server)
    e = engine(up.url("localhost"), "--upstream-ca", str(pki.ca.cert_path))
    answered(chat, e.port)


def test_upstream_ca_bundle_with_other_certificates(chat, pki, serve, engine, tmp_path):
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(pki.other_ca.cert + pki.ca.cert)
    up = serve(pki.server)
    e = engine(up.url(), "--upstream-ca", str(bundle))
    answered(chat, e.port)


def test_wrong_ca_is_unavailable_naming_the_upstream(chat, pki, serve, engine):
    up = serve(pki.server)
    e = engine(up.url(), "--upstream-ca", str(pki.other_ca.cert_path))
    unavailable(chat, e.port, up.url())
    unavailable(chat, e.port, up.url(), stream=True)
    unavailable(chat, e.port, up.url())
    still_serving(e)
    assert up.peers == [], "a call reached the upstream through an untrusted connection"


def test_system_roots_do_not_trust_the_test_ca(chat, pki, serve, engine):
    # Without --upstream-ca, the system bundle: the test CA is not in it.
    up = serve(pki.server)
    e = engine(up.url())
    unavailable(chat, e.port, up.url())
    still_serving(e)


def test_upstream_restart_is_reconnected(chat, pki, serve, engine):
    """The engine's TLS connection to the upstream ends with the upstream;
    while it is down calls are UNAVAILABLE, and once it is back the next
    call is answered on a new connection."""
    up = serve(pki.server, client_ca=pki.ca)
    e = engine(
        up.url(),
        *mtls_flags(pki),
    )
    answered(chat, e.port)
    up.server.stop(0).wait(5)
    unavailable(chat, e.port, up.url())
    again = serve(pki.server, client_ca=pki.ca, port=up.port)
    assert again.port == up.port
    answered(chat, e.port, "back")
    assert again.peers == [CLIENT_CN]


# --------------------------------------------------------------------------
# Mutual TLS
# --------------------------------------------------------------------------


def test_mtls_with_client_certificate(chat, pki, serve, engine):
    up = serve(pki.server, client_ca=pki.ca)
    e = engine(
        up.url(),
        *mtls_flags(pki),
    )
    answered(chat, e.port)
    assert subscribe(chat, e.port, 5) == [(f"m{i}", i) for i in range(5)]
    answered(chat, e.port, "second")
    assert up.peers == [CLIENT_CN, CLIENT_CN]


def test_mtls_without_client_certificate_is_unavailable(chat, pki, serve, engine):
    up = serve(pki.server, client_ca=pki.ca)
    e = engine(up.url(), "--upstream-ca", str(pki.ca.cert_path))
    unavailable(chat, e.port, up.url())
    # The engine stays up and serves the next calls, which fail the same way.
    still_serving(e)
    unavailable(chat, e.port, up.url(), stream=True)
    unavailable(chat, e.port, up.url())
    still_serving(e)
    assert up.peers == []


def test_mtls_with_client_certificate_from_another_ca_is_unavailable(chat, pki, serve, engine):
    up = serve(pki.server, client_ca=pki.ca)
    e = engine(
        up.url(),
        "--upstream-ca",
        str(pki.ca.cert_path),
        "--upstream-cert",
        str(pki.other_client.cert_path),
        "--upstream-key",
        str(pki.other_client.key_path),
    )
    unavailable(chat, e.port, up.url())
    unavailable(chat, e.port, up.url())
    still_serving(e)
    assert up.peers == []


# --------------------------------------------------------------------------
# --upstream-server-name
# --------------------------------------------------------------------------


def test_server_name_flag_checks_that_name(chat, pki, serve, engine, named_server):
    up = serve(named_server)
    e = engine(up.url(), "--upstream-ca", str(pki.ca.cert_path), "--upstream-server-name", "upstream.test")
    answered(chat, e.port)
    assert subscribe(chat, e.port, 3) == [("m0", 0), ("m1", 1), ("m2", 2)]


def test_name_only_certificate_fails_without_server_name(chat, pki, serve, engine, named_server):
    up = serve(named_server)
    # Checked against 127.0.0.1, which the certificate does not carry.
    e = engine(up.url(), "--upstream-ca", str(pki.ca.cert_path))
    unavailable(chat, e.port, up.url())
    still_serving(e)
    assert up.peers == []


def test_server_name_flag_overrides_the_url_host(chat, pki, serve, engine):
    # The certificate carries localhost and 127.0.0.1, not the name given.
    up = serve(pki.server)
    e = engine(up.url(), "--upstream-ca", str(pki.ca.cert_path), "--upstream-server-name", "upstream.test")
    unavailable(chat, e.port, up.url())
    still_serving(e)


# --------------------------------------------------------------------------
# Upstreams that do not speak TLS
# --------------------------------------------------------------------------


def test_https_to_a_cleartext_upstream_is_unavailable(chat, pki, engine):
    _, rpc = chat
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_ChatServicer_to_server(rpc.ChatServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        url = f"https://127.0.0.1:{port}"
        e = engine(url, "--upstream-ca", str(pki.ca.cert_path))
        unavailable(chat, e.port, url)
        still_serving(e)
    finally:
        server.stop(0)


def test_http_to_a_tls_upstream_is_unavailable(chat, pki, serve, engine):
    up = serve(pki.server)
    url = f"http://127.0.0.1:{up.port}"
    e = engine(url)
    unavailable(chat, e.port, url)
    still_serving(e)


def test_silent_upstream_fails_within_the_connect_timeout(chat, pki, engine):
    # A TCP listener that never accepts: the connection is made (by the
    # kernel) but the TLS handshake gets no answer.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        e = engine(url, "--upstream-ca", str(pki.ca.cert_path), "--upstream-connect-timeout-ms", "500")
        unavailable(chat, e.port, url)
        still_serving(e)


# --------------------------------------------------------------------------
# Start errors
# --------------------------------------------------------------------------


def start_error(empty: Path, *flags: str) -> str:
    """Runs `engine run` with `flags`, which must make it exit non-zero at
    start; returns the error line (the first line of stderr)."""
    done = run_engine_expecting_failure(
        ["run", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--protos", str(empty), "--rules", str(empty), *flags]
    )
    lines = done.stderr.strip().splitlines()
    assert lines, "no error on stderr"
    assert lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_missing_upstream_ca_file(empty, tmp_path):
    missing = tmp_path / "nonexistent-ca.pem"
    line = start_error(empty, "--upstream", "https://127.0.0.1:1", "--upstream-ca", str(missing))
    assert f"`{missing}`" in line, line
    assert "upstream CA" in line, line


def test_garbage_upstream_ca_file(empty, tmp_path):
    garbage = tmp_path / "garbage-ca.pem"
    garbage.write_text("not a certificate\n")
    line = start_error(empty, "--upstream", "https://127.0.0.1:1", "--upstream-ca", str(garbage))
    assert f"`{garbage}`" in line, line


def test_unsupported_upstream_scheme(empty):
    line = start_error(empty, "--upstream", "ftp://x")
    assert "`ftp://x`" in line, line


def test_upstream_cert_without_key(empty, pki):
    line = start_error(empty, "--upstream", "https://127.0.0.1:1", "--upstream-cert", str(pki.client.cert_path))
    assert "--upstream-cert" in line and "--upstream-key" in line, line


def test_upstream_key_without_cert(empty, pki):
    line = start_error(empty, "--upstream", "https://127.0.0.1:1", "--upstream-key", str(pki.client.key_path))
    assert "--upstream-cert" in line and "--upstream-key" in line, line


def client_key_error(empty, pki, key) -> str:
    """The start-up error with the test client's certificate and `key`."""
    flags = ["--upstream-cert", str(pki.client.cert_path), "--upstream-key", str(key)]
    return start_error(empty, "--upstream", "https://127.0.0.1:1", *flags)


def test_missing_upstream_client_key_file(empty, pki, tmp_path):
    missing = tmp_path / "nonexistent.key"
    line = client_key_error(empty, pki, missing)
    assert f"`{missing}`" in line, line


def test_upstream_client_key_that_does_not_match(empty, pki):
    line = client_key_error(empty, pki, pki.other_client.key_path)
    assert f"`{pki.other_client.key_path}`" in line, line


@pytest.mark.parametrize(
    "flag,value",
    [("--upstream-ca", "ca"), ("--upstream-server-name", "upstream.test"), ("--upstream-cert", "client")],
)
def test_tls_flags_with_a_cleartext_upstream(empty, pki, flag, value):
    extra = [flag, {"ca": str(pki.ca.cert_path), "client": str(pki.client.cert_path)}.get(value, value)]
    if flag == "--upstream-cert":
        extra += ["--upstream-key", str(pki.client.key_path)]
    line = start_error(empty, "--upstream", "http://127.0.0.1:1", *extra)
    assert "`http://127.0.0.1:1`" in line, line
    assert "https://" in line, line
