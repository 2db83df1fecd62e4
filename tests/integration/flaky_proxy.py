"""A TCP proxy in front of a real server that can lose one reply and then stay unreachable for a while:
the network failures a nightly run meets, without touching the server itself."""

from __future__ import annotations

import socket
import struct
import threading
import time


def _reset(sock: socket.socket) -> None:
    """Drop the connection as a crashed peer would (shutdown also wakes a thread blocked reading it)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FlakyProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, byte for byte, until told to misbehave."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._marker: bytes | None = None
        self._outage_s = 0.0
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.lost_replies = 0
        self.refused_connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lose_reply_to(self, request_marker: bytes, then_down_for_s: float = 0.0) -> None:
        """The next request containing `request_marker` reaches the server, which acts on it, but the
        connection is reset before its reply gets back; new connections are then reset for
        `then_down_for_s` seconds."""
        with self._lock:
            self._marker, self._outage_s = request_marker, then_down_for_s

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            if time.monotonic() < self._down_until:
                self.refused_connections += 1
                _reset(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            lose_next_reply = threading.Event()
            threading.Thread(
                target=self._requests, args=(client, upstream, lose_next_reply), daemon=True
            ).start()
            threading.Thread(
                target=self._replies, args=(upstream, client, lose_next_reply), daemon=True
            ).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, lose_next_reply: threading.Event):
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        lose_next_reply.set()
                upstream.sendall(data)
        except OSError:
            pass
        _reset(upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket, lose_next_reply: threading.Event):
        try:
            while data := upstream.recv(65536):
                if lose_next_reply.is_set():
                    with self._lock:
                        self.lost_replies += 1
                        self._down_until = time.monotonic() + self._outage_s
                    break
                client.sendall(data)
        except OSError:
            pass
        _reset(client)
        _reset(upstream)
