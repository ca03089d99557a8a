"""A GCS that fails on purpose, on loopback: the real TensorFlow/libcurl GCS client of tensorflow-datasets meets
each way a bucket can be out of reach, whatever this machine's own network does.

`FakeGCS(mode)` is an HTTP proxy (libcurl honours `https_proxy`) that terminates TLS for Google's hosts with
a certificate of its own test CA (TensorFlow's curl reads `CURL_CA_BUNDLE`) and answers as GCS would:
- "403": the caller has no access (a bucket of someone else's, or credentials without the role);
- "404": no such bucket;
- "401": no credentials at all: the metadata server is absent (404) and GCS refuses the anonymous caller;
- "hang": accepts the connection and never answers (a firewall that drops, a dead endpoint).
`env(mode, tmp)` gives a stage's environment for those, and for two that need no server: "dns" (a proxy
host that cannot resolve: `.invalid` never does) and "refused" (a loopback port nobody listens on).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import socketserver
import ssl
import threading
from pathlib import Path

HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
ERRORS = {
    "403": (403, "Forbidden", "caller does not have storage.objects.list access to the Google Cloud Storage bucket."),
    "404": (404, "Not Found", "The specified bucket does not exist."),
    "401": (401, "Unauthorized", "Anonymous caller does not have storage.objects.get access to the Google "
                                 "Cloud Storage object."),
}


def make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """(CA bundle, server cert, server key) for HOSTS, written under `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("fake-gcs test CA")).issuer_name(name("fake-gcs test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name(HOSTS[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _read_head(f) -> tuple[str, int]:
    """The request line and Content-Length of one HTTP request (its headers read)."""
    line, length = f.readline().decode("latin-1").strip(), 0
    while (h := f.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = h.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    return line, length


def _reply(f, status: int, reason: str, body: bytes) -> None:
    f.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body)
    f.flush()


class FakeGCS:
    def __init__(self, mode: str, folder: Path):
        assert mode in (*ERRORS, "hang"), mode
        self.mode, self.requests, self._hold = mode, [], []
        self.ca, cert, key = make_ca(folder)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                fake.serve(self.connection, self.rfile)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, conn: socket.socket, rfile) -> None:
        line, length = _read_head(rfile)
        rfile.read(length)
        self.requests.append(line)
        if self.mode == "hang":
            self._hold.append(conn)  # keep it open: the client waits for an answer that never comes
            threading.Event().wait(600)
            return
        wfile = conn.makefile("wb")
        if not line.startswith("CONNECT "):  # plain HTTP through the proxy: the GCE metadata server
            _reply(wfile, 404, "Not Found", b"no metadata server here")
            return
        wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        wfile.flush()
        with self.tls.wrap_socket(conn, server_side=True) as tls:
            f = tls.makefile("rwb")
            inner, length = _read_head(f)
            f.read(length)
            self.requests.append(inner)
            status, reason, message = ERRORS[self.mode]
            _reply(f, status, reason, json.dumps({"error": {"code": status, "message": message}}).encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(mode: str, folder: Path, fake: FakeGCS | None = None) -> dict:
    """A stage's environment in which GCS fails by `mode`: no credentials of the user's are found, and every
    request goes to the proxy `mode` names."""
    proxy = {"dns": "http://proxy.invalid:3128", "refused": f"http://127.0.0.1:{free_port()}"}.get(
        mode, f"http://127.0.0.1:{fake.port}" if fake else None)
    assert proxy, f"mode {mode} needs a FakeGCS"
    e = {k: v for k, v in os.environ.items() if k.lower() not in (
        "https_proxy", "http_proxy", "all_proxy", "no_proxy", "google_application_credentials")}
    e.update(https_proxy=proxy, http_proxy=proxy, HTTPS_PROXY=proxy, HTTP_PROXY=proxy,
             CLOUDSDK_CONFIG=str(folder / "gcloud"))
    if fake:
        e["CURL_CA_BUNDLE"] = str(fake.ca)
    return e
