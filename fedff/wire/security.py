"""Channel security for workers: TLS, mutual TLS and a shared bearer token.

Servers and clients are configured from the same `Security` value, so a chain is set up
with one set of flags on every machine. Without credentials, a peer is refused before it
reaches the servicer: TLS fails the handshake, the token check answers UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc

from fedff.errors import FedffError

TOKEN_ENV = "FEDFF_TOKEN"
RUN_HEADER = "fedff-run"  # call metadata: the run a driver (and its chain) acts for
logger = logging.getLogger("fedff.security")
# Keepalive on every channel: a dead peer is noticed in ~30 s even on an idle stream.
_BOTH = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.http2.max_frame_size", 4 * 2**20),
]
CHANNEL_OPTIONS = [*_BOTH, ("grpc.http2.max_pings_without_data", 0)]
SERVER_OPTIONS = [
    *_BOTH,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),  # a second worker on a busy port fails instead of sharing it
]


class SecurityError(FedffError, ValueError):
    """Missing or unreadable credentials; the message names the file or flag."""


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read the {what} '{path}' ({e.strerror}); make "
                            f"development certificates with scripts/make_dev_certs.py") from e


@dataclass(frozen=True)
class Security:
    """TLS files (PEM) and an optional token; all None means plaintext, no token."""

    ca: Path | None = None  # verifies the peer: the server (clients) or clients (mTLS)
    cert: Path | None = None  # this process's certificate chain
    key: Path | None = None
    mutual: bool = False  # servers demand a client certificate signed by `ca`
    token: str | None = None
    server_name: str | None = None  # override the name checked in the server certificate
    run: str | None = None  # sent on every call: a configured worker serves only its run

    @classmethod
    def from_args(cls, ca: str | None, cert: str | None, key: str | None, mutual: bool,
                  token_file: str | None, server_name: str | None = None) -> "Security":
        token = os.environ.get(TOKEN_ENV) or None
        if token_file:
            token = (_read(Path(token_file), "token file") or b"").decode().strip()
            if not token:
                raise SecurityError(f"the token file '{token_file}' is empty")
        if mutual and not (ca and cert and key):
            raise SecurityError("--mtls needs --tls-ca, --tls-cert and --tls-key")
        if bool(cert) != bool(key):
            raise SecurityError("--tls-cert and --tls-key go together")
        return cls(Path(ca) if ca else None, Path(cert) if cert else None,
                   Path(key) if key else None, mutual, token, server_name)

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    @property
    def authenticated(self) -> bool:
        """A peer must prove who it is: a shared token, or a client certificate."""
        return bool(self.token) or self.mutual

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        if self.cert is None:
            raise SecurityError("a TLS server needs --tls-cert and --tls-key")
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        return grpc.ssl_server_credentials([pair], root_certificates=_read(self.ca, "CA"),
                                           require_client_auth=self.mutual)

    def channel(self, address: str) -> grpc.Channel:
        options = list(CHANNEL_OPTIONS)
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA"),
            private_key=_read(self.key, "TLS key") if self.mutual else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.mutual else None)
        return grpc.secure_channel(address, creds, options=options)

    def metadata(self) -> list[tuple[str, str]]:
        meta = [("authorization", f"Bearer {self.token}")] if self.token else []
        return meta + ([(RUN_HEADER, self.run)] if self.run else [])


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without the shared token (health checks stay open)."""

    def __init__(self, token: str,
                 on_refusal: Callable[[str, grpc.StatusCode, str], None] | None = None):
        self._expected = f"Bearer {token}".encode()
        self._on_refusal = on_refusal  # (peer, code, message): the worker's bounded log

    def intercept_service(self, continuation: Callable[..., Any],
                          details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(details)
        return _refuse(continuation(details), self._on_refusal)


def _refuse(handler: grpc.RpcMethodHandler | None,
            on_refusal: Callable[[str, grpc.StatusCode, str], None] | None
            ) -> grpc.RpcMethodHandler | None:
    message = f"missing or wrong token; pass the shared token with --token-file or ${TOKEN_ENV}"

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        if on_refusal is not None:
            on_refusal(context.peer(), grpc.StatusCode.UNAUTHENTICATED, message)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def is_loopback(address: str) -> bool:
    """True for HOST:PORT on this machine only (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0, [::]): reachable from elsewhere


def check_exposure(addresses: list[str], security: Security, insecure: bool, role: str) -> None:
    """Secure by default: serving on (`role="serve"`) or driving (`"drive"`) workers at
    an address other hosts can reach needs a token or mutual TLS, unless the user chose
    `--insecure`, which is logged as a warning."""
    exposed = [a for a in addresses if not is_loopback(a)]
    if not exposed or security.authenticated:
        return
    what = (f"serving on {exposed[0]} without credentials lets anyone who reaches the "
            f"port reconfigure this worker, read or overwrite its weights and redirect "
            f"its activations" if role == "serve" else
            f"driving workers at {', '.join(exposed)} without credentials sends your data "
            f"to whoever answers there")
    if insecure:
        logger.warning("--insecure: %s", what)
        return
    raise SecurityError(f"{what}; add --token-file FILE (or ${TOKEN_ENV}) or --mtls with "
                        f"--tls-ca/--tls-cert/--tls-key (the same on every worker and the "
                        f"driver), use a loopback address, or pass --insecure to accept it")
