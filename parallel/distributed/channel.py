"""Links between rank 0 and each replica's leader: work goes out, tokens and records come back.

Rank 0 holds a Hub: one inbox of (replica, message) from every leader, and `send(replica, message)`. Rank 0's
own replica talks to it through in-process queues; every other leader through one authenticated TCP connection
to rank 0 (multiprocessing.connection: pickled messages after an HMAC handshake with a key that only the job's
store holds). Rank 0 publishes its address and the key in the store; leaders connect once at start. The store
carries only heartbeats and this rendezvous, never a step's tokens.
"""

from __future__ import annotations

import os
import queue
import secrets
import socket
import threading
from multiprocessing.connection import Client, Connection, Listener

import torch.distributed as dist

KEY, ADDRESS = "channel/key", "channel/address"


class Link:
    """A leader's end: `send` a message to rank 0; `receive` every message that has arrived, waiting up to
    `timeout_s` for the first."""

    def send(self, message) -> None:
        raise NotImplementedError

    def receive(self, timeout_s: float = 0.0) -> list:
        raise NotImplementedError


class LocalLink(Link):
    """Rank 0's own replica: its messages go straight into the hub's inbox."""

    def __init__(self, hub_inbox: queue.Queue):
        self.hub_inbox, self.inbox = hub_inbox, queue.Queue()

    def send(self, message) -> None:
        self.hub_inbox.put((0, message))

    def receive(self, timeout_s: float = 0.0) -> list:
        messages = []
        try:
            messages.append(self.inbox.get(timeout=timeout_s) if timeout_s else self.inbox.get_nowait())
            while True:
                messages.append(self.inbox.get_nowait())
        except queue.Empty:
            return messages


class SocketLink(Link):
    def __init__(self, conn: Connection):
        self.conn = conn

    def send(self, message) -> None:
        self.conn.send(message)

    def receive(self, timeout_s: float = 0.0) -> list:
        messages = []
        while self.conn.poll(0 if messages else timeout_s):
            messages.append(self.conn.recv())
        return messages


class Hub:
    """Rank 0's end of every link. A leader whose connection breaks shows up in the inbox as ("gone",)."""

    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        self.local = LocalLink(self.inbox)
        self.connections: dict[int, Connection] = {}
        self.lock = threading.Lock()  # handler threads and the dispatcher both send

    def send(self, replica: int, message) -> None:
        with self.lock:
            if replica == 0:
                self.local.inbox.put(message)
            elif replica in self.connections:
                try:
                    self.connections[replica].send(message)
                except OSError:  # the replica is gone; its ("gone",) is in the inbox
                    pass

    def accept(self, store: dist.Store, replicas: int) -> None:
        """Wait for the other replicas' leaders to connect (each first sends its replica number)."""
        if replicas == 1:
            return
        key = secrets.token_bytes(32)
        with Listener((_own_address(), 0), authkey=key) as listener:
            store.set(KEY, key)
            store.set(ADDRESS, f"{listener.address[0]}:{listener.address[1]}")
            for _ in range(replicas - 1):
                conn = listener.accept()
                replica = conn.recv()
                self.connections[replica] = conn
                threading.Thread(target=self._relay, args=(replica, conn), daemon=True, name=f"link-{replica}").start()

    def _relay(self, replica: int, conn: Connection) -> None:
        try:
            while True:
                self.inbox.put((replica, conn.recv()))
        except (EOFError, OSError):
            self.inbox.put((replica, ("gone",)))


def connect(store: dist.Store, replica: int) -> SocketLink:
    """A leader of replica > 0: its link to rank 0."""
    host, port = store.get(ADDRESS).decode().rsplit(":", 1)
    conn = Client((host, int(port)), authkey=store.get(KEY))
    conn.send(replica)
    return SocketLink(conn)


def _own_address() -> str:
    """The address other nodes reach this one at: the interface that routes to the rendezvous host."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))))
        return s.getsockname()[0]
