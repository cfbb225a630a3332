"""systemd notifications (Type=notify): READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

A no-op unless systemd set NOTIFY_SOCKET. WATCHDOG=1 is sent from the supervisor loop (never
from the merge worker, whose merges take minutes) at half of WATCHDOG_USEC when systemd asks for
a watchdog, else at most once per second.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        if self._sd is not None and self._sd.socket is not None:
            # never block the supervisor loop on a full socket (a reader that is not reading): drop instead
            self._sd.socket.setblocking(False)
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else 1.0
        self._last_watchdog = 0.0
        self._last_status = ""

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")
        self._last_status = status

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._send(f"STATUS={status}")
            self._last_status = status

    def watchdog(self) -> None:
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval:
            self._send("WATCHDOG=1")
            self._last_watchdog = now

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")
