"""TLS and mTLS on the engine's gRPC listener, with grpcio as the client.

A small PKI is made at test time with the `cryptography` package: a CA, a
server certificate for 127.0.0.1 and localhost, a client certificate from the
same CA, and a second CA with a client certificate of its own. Each test
starts its own engine (the binary, as test_grpcio.py does: `WIRESTUB_ENGINE`,
default target/debug/engine, compiling protos/ and rules/) as

    engine run --listen 127.0.0.1:0 --tls-listen 127.0.0.1:0
               --tls-cert FILE --tls-key FILE [--tls-client-ca FILE]

reads the two `listening on` lines (`wirestub engine listening on ADDR` for
cleartext, `... ADDR (tls)` for TLS) and calls helloworld.Greeter/SayHello,
which the example rules answer with "Hi Tom (from mock)" for name "Tom".

What is checked: TLS calls with the CA as the only trusted root, by IP and
by name; cleartext beside TLS; every PEM key form the engine reads; a chain
with an intermediate; ALPN `h2` (and a client without it refused); mTLS with
a client certificate from the right CA, from another CA, and none; and start
errors (missing, garbage, mismatched files), each naming the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import engine_process
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SAY_HELLO = "/helloworld.Greeter/SayHello"
# HelloRequest { name: "Tom" }.
TOM = b"\x0a\x03Tom"
HI_TOM = "Hi Tom (from mock)"
TIMEOUT = 10.0
# A call that must fail gets this long: a refused handshake fails at once.
FAIL_TIMEOUT = 5.0
LISTENING = re.compile(r"listening on (\S+):(\d+)(\s+\(tls\))?\s*$")


# --------------------------------------------------------------------------
# The PKI
# --------------------------------------------------------------------------


@dataclass
class Issued:
    """A certificate and its key, as PEM, and the files they are in."""

    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    private_key: object


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wirestub tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_pem(key, form: str) -> bytes:
    """`pkcs8` (BEGIN PRIVATE KEY) or `traditional` (BEGIN RSA PRIVATE KEY
    for RSA, BEGIN EC PRIVATE KEY for EC)."""
    fmt = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }[form]
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def issue(
    directory: Path,
    name: str,
    *,
    issuer: Issued | None = None,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
    key=None,
    key_form: str = "pkcs8",
    chain: list[Issued] = (),
) -> Issued:
    """A certificate named `name` (self-signed when `issuer` is None), written
    to DIR/NAME.crt (followed by `chain`) and DIR/NAME.key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = _name(f"wirestub test {name}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    signer = issuer.private_key if issuer else key
    certificate = builder.sign(signer, hashes.SHA256())
    cert = certificate.public_bytes(serialization.Encoding.PEM) + b"".join(c.cert for c in chain)
    key_pem = _key_pem(key, key_form)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key_pem)
    return Issued(cert, key_pem, cert_path, key_path, certificate, key)


@dataclass
class Pki:
    dir: Path
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = issue(d, "ca", ca=True)
    other_ca = issue(d, "other-ca", ca=True)
    return Pki(
        dir=d,
        ca=ca,
        server=issue(d, "server", issuer=ca, server=True),
        client=issue(d, "client", issuer=ca, client=True),
        other_ca=other_ca,
        other_client=issue(d, "other-client", issuer=other_ca, client=True),
    )


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------


class TlsEngine(engine_process.EngineProcess):
    """An engine with its cleartext port (None with `--listen off`) and its
    TLS port."""

    def __init__(self, proc: subprocess.Popen, plain: int | None, tls: int, log_path: Path):
        super().__init__(proc, plain if plain is not None else tls, log_path)
        self.plain = plain
        self.tls = tls


def engine_args(files: tuple[Path, Path], *flags: str, client_ca: Path | None = None) -> list[str]:
    """`run FLAGS... --tls-listen 127.0.0.1:0 --tls-cert CERT --tls-key KEY`,
    with `--listen 127.0.0.1:0` unless FLAGS has a `--listen`."""
    cert, key = files
    args = ["run", *flags, "--tls-listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
    if client_ca is not None:
        args += ["--tls-client-ca", str(client_ca)]
    if "--listen" not in flags:
        args += ["--listen", "127.0.0.1:0"]
    return args


def start_engine(log_dir: Path, args: list[str]) -> TlsEngine:
    """Runs the engine with `args` and waits for its `listening on` lines:
    the TLS one, and the cleartext one unless `--listen off`."""
    cmd = [str(engine_process.engine_binary()), *args]
    want_plain = not any(a == "--listen" and b == "off" for a, b in zip(args, args[1:]))
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "debug,h2=info")

    def port_of(line: str):
        m = LISTENING.search(line)
        return ("tls" if m.group(3) else "plain", int(m.group(2))) if m else None

    def ready_with(ports: dict[str, int]) -> bool:
        return "tls" in ports and ("plain" in ports or not want_plain)

    proc, ports, log_path = engine_process.start_reading_ports(cmd, log_dir, port_of, ready_with, env=env)
    return TlsEngine(proc, ports.get("plain"), ports["tls"], log_path)


@pytest.fixture
def engine_with(tmp_path, pki):
    """Starts engines serving the test server certificate (or the files
    given); stops them after the test and checks they neither crashed nor
    panicked."""
    started: list[TlsEngine] = []

    def start(
        *flags: str, client_ca: Path | None = None, files: tuple[Path, Path] | None = None
    ) -> TlsEngine:
        files = files or (pki.server.cert_path, pki.server.key_path)
        e = start_engine(tmp_path, engine_args(files, *flags, client_ca=client_ca))
        started.append(e)
        return e

    yield start
    for e in started:
        engine_process.stop_cleanly(e)


def run_engine_expecting_failure(args: list[str]) -> subprocess.CompletedProcess:
    """Runs the engine with `args`, which must make it exit at start."""
    cmd = [str(engine_process.engine_binary()), *args]
    try:
        done = subprocess.run(
            cmd,
            cwd=engine_process.REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=float(os.environ.get("WIRESTUB_START_TIMEOUT", "120")),
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not exit: {e.stdout!r}")
    assert done.returncode != 0, f"{' '.join(cmd)} exited 0:\n{done.stdout}\n{done.stderr}"
    assert "listening on" not in done.stdout, done.stdout
    assert "panicked" not in done.stderr, done.stderr
    return done


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


def decode_reply(reply: bytes) -> str:
    """HelloReply { message = 1 } with a short string, as the rules answer."""
    assert reply[:1] == b"\x0a" and reply[1] < 0x80, f"unexpected reply {reply!r}"
    return reply[2 : 2 + reply[1]].decode()


def tls_channel(
    port: int,
    root: bytes,
    client: Issued | None = None,
    host: str = "127.0.0.1",
    name_override: str | None = None,
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    options = [("grpc.enable_http_proxy", 0)]
    if name_override:
        options.append(("grpc.ssl_target_name_override", name_override))
    return grpc.secure_channel(f"{host}:{port}", creds, options=options)


def say_hello(channel: grpc.Channel, timeout: float = TIMEOUT) -> str:
    return decode_reply(channel.unary_unary(SAY_HELLO)(TOM, timeout=timeout))


def tls_say_hello(port: int, root: bytes, client: Issued | None = None, **kw) -> str:
    with tls_channel(port, root, client, **kw) as ch:
        return say_hello(ch)


def plain_say_hello(port: int, timeout: float = TIMEOUT) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        return say_hello(ch, timeout)


def failed_call(channel: grpc.Channel) -> grpc.RpcError:
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            say_hello(channel, FAIL_TIMEOUT)
    return info.value


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def test_tls_call_succeeds(engine_with, pki):
    e = engine_with()
    assert tls_say_hello(e.tls, pki.ca.cert) == HI_TOM


def test_tls_call_by_name(engine_with, pki):
    e = engine_with()
    # The certificate is for `localhost` too: checked by that name.
    assert tls_say_hello(e.tls, pki.ca.cert, name_override="localhost") == HI_TOM


def test_plaintext_listener_serves_beside_tls(engine_with, pki):
    e = engine_with()
    assert e.plain is not None and e.plain != e.tls
    assert plain_say_hello(e.plain) == HI_TOM
    assert tls_say_hello(e.tls, pki.ca.cert) == HI_TOM
    # Each listener speaks only its own: cleartext HTTP/2 on the TLS port
    # is not served.
    plain_to_tls = grpc.insecure_channel(f"127.0.0.1:{e.tls}", options=[("grpc.enable_http_proxy", 0)])
    err = failed_call(plain_to_tls)
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err
    assert plain_say_hello(e.plain) == HI_TOM


def test_tls_only_with_listen_off(engine_with, pki):
    e = engine_with("--listen", "off")
    assert e.plain is None
    assert tls_say_hello(e.tls, pki.ca.cert) == HI_TOM


def test_untrusted_server_certificate_is_refused_by_the_client(engine_with, pki):
    e = engine_with()
    err = failed_call(tls_channel(e.tls, pki.other_ca.cert))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert tls_say_hello(e.tls, pki.ca.cert) == HI_TOM


@pytest.mark.parametrize(
    "algorithm,key_form,begin",
    [
        ("ec", "pkcs8", b"-----BEGIN PRIVATE KEY-----"),
        ("ec", "traditional", b"-----BEGIN EC PRIVATE KEY-----"),
        ("rsa", "pkcs8", b"-----BEGIN PRIVATE KEY-----"),
        ("rsa", "traditional", b"-----BEGIN RSA PRIVATE KEY-----"),
    ],
)
def test_every_key_form_serves(engine_with, pki, tmp_path, algorithm, key_form, begin):
    if algorithm == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = issue(tmp_path, "server", issuer=pki.ca, server=True, key=key, key_form=key_form)
    assert server.key.startswith(begin), server.key[:40]
    e = engine_with(files=(server.cert_path, server.key_path))
    assert tls_say_hello(e.tls, pki.ca.cert) == HI_TOM


def test_certificate_chain_with_intermediate(engine_with, pki, tmp_path):
    intermediate = issue(tmp_path, "intermediate", issuer=pki.ca, ca=True)
    server = issue(tmp_path, "leaf", issuer=intermediate, server=True, chain=[intermediate])
    e = engine_with(files=(server.cert_path, server.key_path))
    # The client trusts only the root: the engine must send the intermediate.
    assert tls_say_hello(e.tls, pki.ca.cert) == HI_TOM


def test_alpn_offers_h2_and_http11(engine_with, pki):
    """ALPN picks h2 for gRPC clients and http/1.1 for browsers and other
    HTTP/1.1 clients (gRPC-Web, Connect), which get their answer on the
    same port."""
    e = engine_with()
    ctx = ssl.create_default_context(cadata=pki.ca.cert.decode())
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", e.tls), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == "h2"
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", e.tls), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == "http/1.1"
            body = bytes([0x0A, 3]) + b"Tom"
            s.sendall(
                b"POST /helloworld.Greeter/SayHello HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/proto\r\nConnection: close\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"content-type: application/proto" in head.lower()
    assert answer == b"\x0a" + bytes([len(HI_TOM)]) + HI_TOM.encode()
    assert tls_say_hello(e.tls, pki.ca.cert) == HI_TOM


# --------------------------------------------------------------------------
# mTLS
# --------------------------------------------------------------------------


def test_mtls_client_from_the_ca_succeeds(engine_with, pki):
    e = engine_with(client_ca=pki.ca.cert_path)
    assert tls_say_hello(e.tls, pki.ca.cert, pki.client) == HI_TOM
    # The cleartext listener is unaffected by --tls-client-ca.
    assert plain_say_hello(e.plain) == HI_TOM


def test_mtls_client_from_another_ca_fails(engine_with, pki):
    e = engine_with(client_ca=pki.ca.cert_path)
    err = failed_call(tls_channel(e.tls, pki.ca.cert, pki.other_client))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert e.logged("TLS handshake failed"), e.log()
    assert tls_say_hello(e.tls, pki.ca.cert, pki.client) == HI_TOM


def test_mtls_client_without_certificate_fails(engine_with, pki):
    e = engine_with(client_ca=pki.ca.cert_path)
    err = failed_call(tls_channel(e.tls, pki.ca.cert))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert e.logged("TLS handshake failed"), e.log()
    assert tls_say_hello(e.tls, pki.ca.cert, pki.client) == HI_TOM


def test_mtls_client_ca_bundle_accepts_either_ca(engine_with, pki, tmp_path):
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(pki.ca.cert + pki.other_ca.cert)
    e = engine_with(client_ca=bundle)
    assert tls_say_hello(e.tls, pki.ca.cert, pki.client) == HI_TOM
    assert tls_say_hello(e.tls, pki.ca.cert, pki.other_client) == HI_TOM


# --------------------------------------------------------------------------
# Start errors: the engine exits non-zero, naming the file
# --------------------------------------------------------------------------


def test_missing_certificate_file(pki, tmp_path):
    missing = tmp_path / "missing.crt"
    done = run_engine_expecting_failure(engine_args((missing, pki.server.key_path)))
    assert f"cannot read TLS certificate `{missing}`" in done.stderr, done.stderr


def test_missing_key_file(pki, tmp_path):
    missing = tmp_path / "missing.key"
    done = run_engine_expecting_failure(engine_args((pki.server.cert_path, missing)))
    assert f"cannot read TLS key `{missing}`" in done.stderr, done.stderr


def test_garbage_certificate_file(pki, tmp_path):
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("this is not a certificate\n")
    done = run_engine_expecting_failure(engine_args((garbage, pki.server.key_path)))
    assert f"no certificate found in `{garbage}`" in done.stderr, done.stderr


def test_certificate_that_is_not_der(pki, tmp_path):
    # PEM framing around bytes that are no certificate.
    junk = tmp_path / "junk.crt"
    junk.write_text("-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQoLDA0ODw==\n-----END CERTIFICATE-----\n")
    done = run_engine_expecting_failure(engine_args((junk, pki.server.key_path)))
    assert f"TLS certificate `{junk}` is not a valid certificate" in done.stderr, done.stderr


def test_key_given_as_certificate(pki):
    # Swapped files: the certificate file holds only a key, and the other
    # way round.
    done = run_engine_expecting_failure(engine_args((pki.server.key_path, pki.server.cert_path)))
    assert f"no certificate found in `{pki.server.key_path}`" in done.stderr, done.stderr


def test_garbage_key_file(pki, tmp_path):
    garbage = tmp_path / "garbage.key"
    garbage.write_text("this is not a key\n")
    done = run_engine_expecting_failure(engine_args((pki.server.cert_path, garbage)))
    assert f"no private key found in `{garbage}`" in done.stderr, done.stderr


def test_key_that_does_not_match_the_certificate(pki):
    done = run_engine_expecting_failure(engine_args((pki.server.cert_path, pki.client.key_path)))
    assert f"TLS key `{pki.client.key_path}` does not match the certificate" in done.stderr, done.stderr


def test_missing_client_ca_file(pki, tmp_path):
    missing = tmp_path / "missing-ca.crt"
    done = run_engine_expecting_failure(
        engine_args((pki.server.cert_path, pki.server.key_path), client_ca=missing)
    )
    assert f"cannot read TLS client CA `{missing}`" in done.stderr, done.stderr


def test_garbage_client_ca_file(pki, tmp_path):
    garbage = tmp_path / "garbage-ca.crt"
    garbage.write_text("not a CA\n")
    done = run_engine_expecting_failure(
        engine_args((pki.server.cert_path, pki.server.key_path), client_ca=garbage)
    )
    assert f"no certificate found in `{garbage}`" in done.stderr, done.stderr
