"""agent/jwks.py against a local HTTPS server with a test CA: a fetched JWKS
lands in the waypoint's jwt_authn provider; unreachable, oversized or invalid
answers keep the last good one, or leave the issuer refused if none."""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from waypoint_scenario import TO_WAYPOINT, WAYPOINT, doc, http_filters, run, view_of

from agent.jwks import JwksError, JwksFetcher, check_uri, fetch
from waypoint.translate import referenced_jwks
from waypoint.translate.authn import UNFETCHED_JWKS

JWKS = '{"keys":[{"kty":"EC","crv":"P-256","x":"AAAA","y":"BBBB","kid":"k1"}]}'
JWKS2 = '{"keys":[{"kty":"EC","crv":"P-256","x":"CCCC","y":"DDDD","kid":"k2"}]}'


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(signer, hashes.SHA256())


class Server:
    """An HTTPS server on 127.0.0.1 answering every GET with ``self.answer``."""

    def __init__(self, tmp: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test jwks CA")])
        ca = _cert("test jwks CA", ca_key, ca_name, ca_key, True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert("jwks", key, ca_name, ca_key, False)
        (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.client_ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        self.answer: tuple[int, bytes, dict[str, str]] = (200, JWKS.encode(), {})
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                status, body, headers = outer.answer
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
        self.httpd.socket = sctx.wrap_socket(self.httpd.socket, server_side=True)
        self.uri = f"https://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.close()


def test_fetch_over_https_with_the_test_ca(server: Server) -> None:
    assert fetch(server.uri, context=server.client_ctx) == JWKS


def test_an_unknown_ca_is_refused(server: Server) -> None:
    with pytest.raises(JwksError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        fetch(server.uri, context=ssl.create_default_context())


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ((200, b"x" * 2048, {}), "larger than 1024 bytes"),
        ((200, b"not json", {}), "not JSON"),
        ((200, b'{"keys": []}', {}), "no non-empty 'keys'"),
        ((200, b"[1]", {}), "no non-empty 'keys'"),
        ((404, b"", {}), "HTTP 404"),
        ((302, b"", {"Location": "http://203.0.113.1/jwks"}), "HTTP 302"),
    ],
    ids=["oversized", "not-json", "empty-keys", "not-object", "404", "redirect"],
)
def test_bad_answers_are_errors(
    server: Server, answer: tuple[int, bytes, dict[str, str]], error: str
) -> None:
    server.answer = answer
    with pytest.raises(JwksError, match=error):
        fetch(server.uri, context=server.client_ctx, max_bytes=1024)


def test_oversized_without_content_length_is_cut_off(server: Server) -> None:
    server.answer = (200, b'{"keys":[' + b" " * 4096 + b"]}", {})
    with pytest.raises(JwksError, match="larger than"):
        fetch(server.uri, context=server.client_ctx, max_bytes=1024)


def test_transport_rules() -> None:
    check_uri("https://issuer.example/jwks")
    check_uri("http://127.0.0.1:8080/jwks")
    check_uri("http://[::1]/jwks")
    check_uri("http://localhost/jwks")
    for bad in ("http://issuer.example/jwks", "http://10.0.0.1/jwks", "file:///etc/passwd", "x"):
        with pytest.raises(JwksError):
            check_uri(bad)


def test_unreachable_is_an_error() -> None:
    with pytest.raises(JwksError):
        fetch("https://127.0.0.1:1/jwks", timeout=2)


def ra(uri: str) -> dict[str, Any]:
    return doc(
        "RequestAuthentication",
        "jwt",
        {"targetRefs": TO_WAYPOINT, "jwtRules": [{"issuer": "https://a", "jwksUri": uri}]},
    )


def provider_jwks(res: Any) -> str:
    (f,) = [f for f in http_filters(res) if f["name"] == "envoy.filters.http.jwt_authn"]
    (p,) = f["typed_config"]["providers"].values()
    return str(p["local_jwks"]["inline_string"])


def test_referenced_jwks_are_those_reaching_the_waypoint() -> None:
    other = doc(
        "RequestAuthentication",
        "other",
        {
            "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "x"}],
            "jwtRules": [{"issuer": "b", "jwksUri": "https://b/jwks"}],
        },
    )
    inline = doc(
        "RequestAuthentication",
        "inline",
        {"targetRefs": TO_WAYPOINT, "jwtRules": [{"issuer": "c", "jwks": JWKS}]},
    )
    v = view_of([ra("https://a/jwks"), other, inline])
    assert referenced_jwks(v, WAYPOINT) == {"https://a/jwks"}


async def _until(cond: Any, what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def test_fetcher_feeds_translation_and_keeps_the_last_good(server: Server) -> None:
    async def go() -> None:
        changed: list[str] = []
        f = JwksFetcher(changed.append, context=server.client_ctx, refresh=0.2, retry_initial=0.1)
        docs = [ra(server.uri)]
        f.want("blog/waypoint", referenced_jwks(view_of(docs), WAYPOINT))
        await _until(lambda: changed, "the first fetch")
        res, report = run(docs, jwks=f.jwks())
        assert provider_jwks(res) == JWKS and not report  # the served keys, inline
        # the server breaks: the last good JWKS stays, the error is reported
        server.answer = (200, b"garbage", {})
        await _until(lambda: f.describe()[server.uri]["error"], "an error")
        assert f.jwks() == {server.uri: JWKS}
        assert f.describe()[server.uri]["fetched"] is True
        assert changed == [server.uri]
        # it recovers with new keys: one more change
        server.answer = (200, JWKS2.encode(), {})
        await _until(lambda: len(changed) == 2, "the new keys")
        assert f.jwks() == {server.uri: JWKS2} and f.describe()[server.uri]["error"] is None
        # no longer wanted: dropped, no more fetches
        f.forget("blog/waypoint")
        assert f.jwks() == {} and f.describe() == {}
        hits = server.hits
        await asyncio.sleep(0.5)
        assert server.hits == hits
        await f.close()

    asyncio.run(go())


def test_never_fetched_leaves_the_issuer_refused(server: Server) -> None:
    async def go() -> None:
        server.answer = (200, json.dumps({"keys": []}).encode(), {})
        f = JwksFetcher(lambda _: None, context=server.client_ctx, retry_initial=0.1)
        f.want("blog/waypoint", [server.uri])
        await _until(lambda: f.describe()[server.uri]["failures"] >= 2, "two failures")
        assert f.jwks() == {}
        assert "keys" in f.describe()[server.uri]["error"]
        res, report = run([ra(server.uri)], jwks=f.jwks())
        assert provider_jwks(res) == UNFETCHED_JWKS
        assert [i.field for i in report] == ["spec.jwtRules[0].jwksUri"]
        await f.close()

    asyncio.run(go())
