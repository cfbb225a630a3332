"""The webhook listener over real HTTP: MLflow's signature scheme, 401 on anything invalid.

The end-to-end case (a real MLflow server delivering a webhook) is in test_mlflow_registry.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from daemon_harness import wait_for
from nufilt_daemon.webhook import WebhookServer, sign
from pydantic import SecretStr

SECRET = "s3cret-for-tests"


def mlflow_signature(secret: str, delivery_id: str, timestamp: str, payload: str) -> str:
    """MLflow's own signer, so the test checks against the sender, not against our copy of it."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    return _generate_hmac_signature(secret, delivery_id, timestamp, payload)


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


@pytest.fixture
def listener() -> Iterator[tuple[WebhookServer, Wakes]]:
    wakes = Wakes()
    server = WebhookServer("127.0.0.1", 0, SecretStr(SECRET), wakes)
    server.start()
    try:
        yield server, wakes
    finally:
        server.stop()


def payload(entity: str = "model_version", action: str = "created") -> bytes:
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": "fine-tunes", "version": "3", "source": "runs:/x/checkpoint"}}).encode()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def signed_headers(body: bytes, secret: str = SECRET, timestamp: int | None = None,
                   delivery_id: str | None = None) -> dict[str, str]:
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": mlflow_signature(secret, delivery_id, ts, body.decode())}


def test_our_signature_matches_mlflows_signer() -> None:
    body = payload()
    assert sign(SECRET, "d-1", "1700000000", body) == mlflow_signature(SECRET, "d-1", "1700000000", body.decode())
    assert sign("other", "d-1", "1700000000", body) != mlflow_signature(SECRET, "d-1", "1700000000", body.decode())


def test_signed_model_version_created_wakes(listener: tuple[WebhookServer, Wakes]) -> None:
    server, wakes = listener
    body = payload()
    status, reply = post(server.url, body, signed_headers(body))
    assert (status, reply["status"]) == (200, "woken")
    assert wakes.count == 1 and server.accepted == 1 and server.rejected == 0


@pytest.mark.parametrize("tamper", ["wrong_secret", "body_changed", "no_signature", "stale", "bad_timestamp"])
def test_invalid_requests_get_401_and_never_wake(listener: tuple[WebhookServer, Wakes], tamper: str) -> None:
    server, wakes = listener
    body = payload()
    headers = signed_headers(body)
    if tamper == "wrong_secret":
        headers = signed_headers(body, secret="not-the-secret")
    elif tamper == "body_changed":
        body = payload(action="updated")  # signed the original, sends another
    elif tamper == "no_signature":
        del headers["X-MLflow-Signature"]
    elif tamper == "stale":  # a correctly signed request captured 10 minutes ago
        headers = signed_headers(body, timestamp=int(time.time()) - 600)
    elif tamper == "bad_timestamp":
        headers["X-MLflow-Timestamp"] = "yesterday"
    status, reply = post(server.url, body, headers)
    assert status == 401 and reply == {"error": "unauthorized"}
    assert wakes.count == 0 and server.rejected == 1 and server.accepted == 0


def test_other_events_and_replays_do_not_wake(listener: tuple[WebhookServer, Wakes]) -> None:
    server, wakes = listener
    other = payload(entity="model_version_alias", action="created")
    assert post(server.url, other, signed_headers(other))[1]["status"] == "ignored"
    body = payload()
    headers = signed_headers(body)
    assert post(server.url, body, headers)[1]["status"] == "woken"
    assert post(server.url, body, headers)[1]["status"] == "duplicate"  # same delivery id again
    assert wakes.count == 1


def test_malformed_and_non_post(listener: tuple[WebhookServer, Wakes]) -> None:
    server, wakes = listener
    body = b"not json"
    assert post(server.url, body, signed_headers(body))[0] == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url, timeout=10)
    assert e.value.code == 405
    assert wakes.count == 0


def test_without_secret_unsigned_requests_wake() -> None:
    wakes = Wakes()
    server = WebhookServer("127.0.0.1", 0, None, wakes)
    server.start()
    try:
        assert post(server.url, payload(), {})[0] == 200
        assert wakes.count == 1
    finally:
        server.stop()
    assert not server.healthy()


def test_secret_never_logged(listener: tuple[WebhookServer, Wakes]) -> None:
    """Reads what the daemon's own log handler writes (not captured stderr, which an earlier test's
    logging setup may have bypassed), and checks it saw the events, so the test can fail."""
    import io

    from nufilt_daemon.logging import configure_logging

    server, _ = listener
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    try:
        body = payload()
        post(server.url, body, signed_headers(body, secret="not-the-secret"))
        post(server.url, body, signed_headers(body))
    finally:
        configure_logging("warning")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert "webhook_rejected" in events and "webhook_wake" in events
    assert SECRET not in stream.getvalue() and "not-the-secret" not in stream.getvalue()


def test_without_secret_wake_ups_are_rate_limited() -> None:
    wakes = Wakes()
    server = WebhookServer("127.0.0.1", 0, None, wakes, unsigned_min_interval_seconds=60)
    server.start()
    try:
        codes = [post(server.url, payload(), {"X-MLflow-Delivery-Id": str(uuid.uuid4())})[0] for _ in range(5)]
    finally:
        server.stop()
    assert codes == [200, 429, 429, 429, 429] and wakes.count == 1 and server.rate_limited == 4


def test_a_half_sent_request_is_dropped_after_the_socket_timeout() -> None:
    import socket

    wakes = Wakes()
    server = WebhookServer("127.0.0.1", 0, SecretStr(SECRET), wakes, request_timeout_seconds=0.5)
    server.start()
    stalled = []
    try:
        for _ in range(12):  # each would hold a thread for ever without a timeout
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
            stalled.append(s)
        t0 = time.monotonic()
        for s in stalled:
            assert s.recv(100) == b""  # closed by the server, not by us
        assert time.monotonic() - t0 < 5
        body = payload()
        assert post(server.url, body, signed_headers(body))[0] == 200  # and it still serves
        assert wakes.count == 1 and server.timed_out == 12
    finally:
        for s in stalled:
            s.close()
        server.stop()


def test_a_trickling_client_is_cut_and_a_flood_of_connections_is_bounded() -> None:
    import socket

    from nufilt_daemon.webhook import CONNECTION_DEADLINES, MAX_CONNECTIONS

    wakes = Wakes()
    server = WebhookServer("127.0.0.1", 0, SecretStr(SECRET), wakes, request_timeout_seconds=0.5)
    server.start()
    held: list[socket.socket] = []
    try:
        # a byte every 0.3 s never trips the 0.5 s socket timeout; the connection's deadline ends it
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        slow.sendall(b"POST / HTTP/1.1\r\n")
        t0, cut = time.monotonic(), False
        while time.monotonic() - t0 < 5:
            time.sleep(0.3)
            try:
                slow.sendall(b"X")
            except OSError:
                cut = True
                break
            slow.settimeout(0.01)
            try:
                if slow.recv(10) == b"":
                    cut = True
                    break
            except TimeoutError:
                pass
        assert cut and time.monotonic() - t0 < 0.5 * CONNECTION_DEADLINES + 1.5
        slow.close()
        # more connections than it serves at once: the extra ones are closed at once, no thread each
        for _ in range(MAX_CONNECTIONS + 8):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"POST / HTTP/1.1\r\n")
            held.append(s)
        wait_for("the extra connections refused", lambda: server.refused_connections >= 8, timeout=5)
        for s in held:
            s.close()
        held.clear()
        body = payload()
        wait_for("it serves again", lambda: post(server.url, body, signed_headers(body))[0] == 200, timeout=10)
    finally:
        for s in held:
            s.close()
        server.stop()


def test_a_wake_up_never_cuts_the_error_back_off_short(tmp_path) -> None:
    from nufilt_daemon.config import MlflowSettings
    from nufilt_daemon.journal import Journal
    from nufilt_daemon.sources.mlflow_registry import MlflowRegistrySource

    class RegistryDown(MlflowRegistrySource):
        def poll_once(self, emit) -> None:  # the registry refuses every poll (an outage we script)
            raise ConnectionError("registry down")

    source = RegistryDown(MlflowSettings(tracking_uri="http://127.0.0.1:9", source_model="m",
                                         poll_interval_seconds=30), tmp_path / "downloads",
                          Journal.in_state_dir(tmp_path / "state"), backoff_initial_seconds=0.5)
    source.start(lambda arrival: None)
    try:
        deadline = time.monotonic() + 2.4
        while time.monotonic() < deadline:  # a flood of wake-ups (an unsigned webhook, say)
            source.wake()
            time.sleep(0.02)
    finally:
        source.stop()
    # polls at 0, 0.5 and 1.5 s (back-off 0.5, 1, 2 s); without the back-off, one per wake-up
    assert 2 <= source.polls <= 4, source.polls
