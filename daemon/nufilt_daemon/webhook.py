"""A small HTTP listener for MLflow Model Registry webhooks: a wake-up call for the MLflow source.

MLflow (3.3+) POSTs JSON `{"entity", "action", "timestamp", "data"}` with the headers
`X-MLflow-Delivery-Id`, `X-MLflow-Timestamp` (Unix seconds) and, when the webhook has a secret,
`X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")>`
(mlflow/webhooks/delivery.py, after the Standard Webhooks scheme).

A request is acted on only if its signature is valid and its timestamp within
`tolerance_seconds` of now (a captured request cannot be replayed later); anything else gets 401
and does nothing. A valid `model_version.created` (or the test event MLflow sends for it) calls
`on_wake()`, nothing more: the poll that follows decides what is new, so a lost, forged or
repeated webhook can at worst cause one extra poll. With no secret configured the signature is
not checked (MLflow sends none then) and the server warns once at start; any local process can
then send wake-ups, so they are rate-limited (one per `unsigned_min_interval_seconds`, others get
429) and, like every wake-up, never cut the MLflow source's error back-off short. Every
connection has a socket timeout (`request_timeout_seconds`): a client that sends half a request
and stalls is dropped instead of holding a thread for ever; and a whole connection lives at most
CONNECTION_DEADLINES of those, so one that trickles a byte every few seconds is dropped too. At most
MAX_CONNECTIONS are served at once; more are closed at once. Secrets and signatures are never
logged.

MLflow delivers only to https and public addresses unless its server runs with
`MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https` and `MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`; put
TLS in front of this listener (a reverse proxy) when MLflow is not on the same trusted network.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from pydantic import SecretStr

from .states import JobState

log = structlog.get_logger("nufilt.webhook")

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
WAKE_EVENTS = {("model_version", "created")}
MAX_BODY_BYTES = 1 << 20
TOLERANCE_SECONDS = 300.0
SEEN_DELIVERIES = 1024
REQUEST_TIMEOUT_SECONDS = 10.0  # per connection: reading the request, idle keep-alive
CONNECTION_DEADLINES = 3  # a connection is closed after this many request timeouts, whatever it sends
MAX_CONNECTIONS = 16  # served at once (a thread each); more are closed on arrival
UNSIGNED_MIN_INTERVAL_SECONDS = 10.0  # without a secret: at most one wake-up this often


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for this request."""
    content = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signature_valid(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str) -> bool:
    expected = sign(secret, delivery_id, timestamp, body)
    # Standard Webhooks allows several space-separated signatures (key rotation); MLflow sends one
    return any(hmac.compare_digest(expected.encode(), candidate.encode()) for candidate in header.split())


class WebhookServer:
    def __init__(self, host: str, port: int, secret: SecretStr | None, on_wake: Callable[[], None], *,
                 tolerance_seconds: float = TOLERANCE_SECONDS, request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
                 unsigned_min_interval_seconds: float = UNSIGNED_MIN_INTERVAL_SECONDS):
        self.host = host
        self.requested_port = port
        self._secret = secret
        self.on_wake = on_wake
        self.tolerance_seconds = tolerance_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.unsigned_min_interval_seconds = unsigned_min_interval_seconds
        self._last_unsigned_wake: float | None = None
        self.rate_limited = 0
        self.timed_out = 0
        self.refused_connections = 0  # beyond MAX_CONNECTIONS
        # counters for the daemon's metrics/status
        self.accepted = 0
        self.rejected = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (differs from the requested one when that was 0)."""
        return self._server.server_address[1] if self._server is not None else self.requested_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> None:
        if self._server is not None:
            if self.healthy():
                return
            self.stop()  # the serving thread died: the supervisor restarts us with a fresh server
        self._server = _BoundedServer((self.host, self.requested_port), self._handler_class(), self)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mlflow-webhook", daemon=True)
        self._thread.start()
        if self._secret is None:
            log.warning("webhook_unsigned", reason="no mlflow.webhook_secret: requests are not authenticated "
                        "(they can only trigger a poll)")
        log.info("webhook_listening", host=self.host, port=self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self._thread is not None and self._thread.is_alive():
            server.shutdown()  # waits for serve_forever to return, so only while it runs
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- deciding on one request -----------------------------------------------------------

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Status code and JSON reply for a POST with these headers (lower-cased names) and body."""
        delivery_id = headers.get(DELIVERY_ID_HEADER.lower(), "")
        timestamp = headers.get(TIMESTAMP_HEADER.lower(), "")
        if self._secret is not None:
            problem = self._authentication_problem(delivery_id, timestamp, body,
                                                   headers.get(SIGNATURE_HEADER.lower(), ""))
            if problem:
                return self._reject(problem)
        try:
            payload = json.loads(body)
            event = (str(payload["entity"]), str(payload["action"]))
        except (ValueError, KeyError, TypeError):
            return 400, {"error": "expected an MLflow webhook payload with entity and action"}
        with self._lock:
            if delivery_id and delivery_id in self._seen:
                return 200, {"status": JobState.DUPLICATE}
            if delivery_id:
                self._seen[delivery_id] = None
                while len(self._seen) > SEEN_DELIVERIES:
                    self._seen.popitem(last=False)
            self.accepted += 1
        if event not in WAKE_EVENTS:
            log.debug("webhook_ignored", webhook_event=".".join(event))
            return 200, {"status": "ignored"}
        if self._secret is None and not self._unsigned_wake_allowed():
            return 429, {"status": "rate-limited", "retry_after_seconds": self.unsigned_min_interval_seconds}
        data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        log.info("webhook_wake", webhook_event=".".join(event), model=str(data.get("name", "")),
                 version=str(data.get("version", "")))
        self.on_wake()
        return 200, {"status": "woken"}

    def _unsigned_wake_allowed(self) -> bool:
        """Unauthenticated wake-ups: one per unsigned_min_interval_seconds (a local flood cannot force polls)."""
        now = time.monotonic()
        with self._lock:
            last = self._last_unsigned_wake
            if last is not None and now - last < self.unsigned_min_interval_seconds:
                self.rate_limited += 1
                return False
            self._last_unsigned_wake = now
        return True

    def _authentication_problem(self, delivery_id: str, timestamp: str, body: bytes, signature: str) -> str | None:
        assert self._secret is not None
        if not (delivery_id and timestamp and signature):
            return "missing signature headers"
        try:
            age = abs(time.time() - int(timestamp))
        except ValueError:
            return "malformed timestamp"
        if not signature_valid(self._secret.get_secret_value(), delivery_id, timestamp, body, signature):
            return "bad signature"
        if age > self.tolerance_seconds:
            return "timestamp outside tolerance"
        return None

    def _reject(self, reason: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.rejected += 1
        log.warning("webhook_rejected", reason=reason)
        return 401, {"error": "unauthorized"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "nufilt-webhook"
            protocol_version = "HTTP/1.1"
            timeout = owner.request_timeout_seconds  # socket timeout of each connection (StreamRequestHandler)

            def handle(self) -> None:
                # a byte every few seconds keeps the socket timeout at bay: the whole connection has a deadline
                deadline = threading.Timer(owner.request_timeout_seconds * CONNECTION_DEADLINES, self._cut)
                deadline.daemon = True
                deadline.start()
                try:
                    super().handle()  # a socket timeout ends up in log_error below (the stdlib catches it)
                except (ConnectionError, OSError) as e:  # a vanished (or cut) client: drop it quietly
                    log.info("webhook_connection_dropped", reason=type(e).__name__)
                    self.close_connection = True
                finally:
                    deadline.cancel()

            def _cut(self) -> None:
                with owner._lock:
                    owner.timed_out += 1
                log.info("webhook_connection_timed_out", seconds=owner.request_timeout_seconds * CONNECTION_DEADLINES)
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_error(self, format: str, *args: Any) -> None:
                if format.startswith("Request timed out"):
                    with owner._lock:
                        owner.timed_out += 1
                    log.info("webhook_connection_timed_out", seconds=owner.request_timeout_seconds)

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self._reply(411, {"error": "Content-Length required"})
                    return
                if length < 0 or length > MAX_BODY_BYTES:
                    self._reply(413, {"error": "body too large"})
                    return
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    status, reply = owner.handle(headers, body)
                except Exception as e:  # on_wake failing must not kill the listener
                    log.error("webhook_failed", error=f"{type(e).__name__}: {e}")
                    status, reply = 500, {"error": "internal error"}
                self._reply(status, reply)

            def do_GET(self) -> None:
                self._reply(405, {"error": "POST MLflow webhooks here"})

            def _reply(self, status: int, reply: dict[str, Any]) -> None:
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                # the default writes every request to stderr; our structured events say enough
                pass

        return Handler


class _BoundedServer(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS served at once: a flood of connections cannot start a thread each (the listen
    backlog is larger, so that what is refused is closed at once rather than left unanswered in the kernel)."""

    request_queue_size = 4 * MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: WebhookServer):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._owner = owner
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with self._owner._lock:
                self._owner.refused_connections += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
