"""Port forwarding over a paramiko connection: a local listener, one direct-tcpip channel per client.

Used by the "sshtunnel" backend instead of ``sshtunnel.SSHTunnelForwarder`` (see vidcap.transport for
why). One thread accepts; one thread per connection copies bytes both ways with ``select`` (paramiko
channels have a selectable ``fileno``), passing half-closes on, so a request/response protocol sees the
same stream it would see over a plain TCP connection.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable

import paramiko

from vidcap.transport import bind_listener

log = logging.getLogger("vidcap.transport")

CHUNK = 65536
_COPY_ERRORS = (paramiko.SSHException, OSError, EOFError)

#: Opens a direct-tcpip channel to (host, port) for a client at (addr, port); raises on failure.
ChannelOpener = Callable[[tuple[str, int], tuple[str, int]], paramiko.Channel]


class ChannelForward:
    """local_host:local_port -> one SSH channel per accepted connection -> remote_host:remote_port."""

    def __init__(
        self,
        open_channel: ChannelOpener,
        local_host: str,
        local_port: int,
        remote_host: str,
        remote_port: int,
        on_close: Callable[[ChannelForward], None] | None = None,
    ) -> None:
        self._open_channel = open_channel
        self._on_close = on_close
        self._listener = bind_listener(local_host, local_port)
        self.local_host = local_host
        self.local_port = int(self._listener.getsockname()[1])
        self.remote_host = remote_host
        self.remote_port = remote_port
        # close() writes here to wake the accept loop: closing a socket another thread waits on in
        # accept() does not wake it everywhere (macOS).
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = threading.Event()
        self._conns: set[tuple[socket.socket, paramiko.Channel]] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"vidcap-forward-{self.local_port}", daemon=True
        )
        self._thread.start()
        log.debug("forward %s:%d -> %s:%d", local_host, self.local_port, remote_host, remote_port)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in ready or self._closed.is_set():
                return
            try:
                client, addr = self._listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(client, addr), daemon=True).start()

    def _serve(self, client: socket.socket, addr: tuple[str, int]) -> None:
        try:
            chan = self._open_channel((self.remote_host, self.remote_port), (addr[0], addr[1]))
        except Exception as exc:  # the client only sees a closed connection; say why in the log
            log.warning(
                "forward %d -> %s:%d: cannot open a channel: %s",
                self.local_port,
                self.remote_host,
                self.remote_port,
                exc,
            )
            client.close()
            return
        pair = (client, chan)
        with self._lock:
            if self._closed.is_set():
                client.close()
                chan.close()
                return
            self._conns.add(pair)
        try:
            pump(client, chan, self._closed)
        finally:
            with self._lock:
                self._conns.discard(pair)
            chan.close()
            client.close()

    def close(self) -> None:
        """Stop listening (the port is free when this returns) and cut the open connections."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for client, chan in conns:
            chan.close()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
        if self._on_close is not None:
            self._on_close(self)


def pump(sock: socket.socket, chan: paramiko.Channel, closed: threading.Event) -> None:
    """Copy both ways until both sides are done or ``closed`` is set."""
    sock_open = chan_open = True
    try:
        while (sock_open or chan_open) and not closed.is_set():
            waiting = [s for s, is_open in ((sock, sock_open), (chan, chan_open)) if is_open]
            ready, _, _ = select.select(waiting, [], [], 1.0)
            if sock in ready:
                data = sock.recv(CHUNK)
                if data:
                    chan.sendall(data)
                else:
                    sock_open = False
                    chan.shutdown_write()
            if chan in ready:
                # Take all that paramiko buffered (up to the window): a 64 KiB read of a 2 MiB buffer
                # copies and shifts the rest each time, which cost ~45% of the forwarder's CPU.
                data = chan.recv(max(CHUNK, chan.in_window_size))
                if data:
                    sock.sendall(data)
                else:
                    chan_open = False
                    sock.shutdown(socket.SHUT_WR)
            if chan.closed:
                return
    except _COPY_ERRORS:
        return
