"""Links between rank 0 and each replica's leader: work goes out, tokens and records come back.

A Hub holds one inbox of (replica, message) from every leader, and `send(replica, message)`. For a batch job it
lives in rank 0: rank 0's own replica talks to it through in-process queues, every other leader through one
authenticated TCP connection (multiprocessing.connection: pickled messages after an HMAC handshake with a key that
only the job's store holds). A server's hub lives in its API process (parallel/serve/api_process.py), and every
leader, rank 0's too, connects to it. The hub's address and key are published in the store; leaders connect
once at start. The store carries only heartbeats and this rendezvous, never a step's tokens.
"""

from __future__ import annotations

import os
import queue
import secrets
import socket
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener

import torch.distributed as dist

from parallel.distributed.runtime import fatal

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
    """A leader's TCP link. The hub gone (rank 0, or the server's API process, ended) ends this rank, saying so:
    nothing more can come, and a traceback would race the message of the rank that knows why."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except OSError:
            self._gone()

    def receive(self, timeout_s: float = 0.0) -> list:
        messages = []
        try:
            while self.conn.poll(0 if messages else timeout_s):
                messages.append(self.conn.recv())
        except (EOFError, OSError):
            self._gone()
        return messages

    def _gone(self) -> None:
        fatal("the link to the dispatcher is gone (rank 0, or the server's API process, ended); exiting")


class Hub:
    """The dispatcher's end of every link. A leader whose connection breaks shows up in the inbox as ("gone",)."""

    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        self.local = LocalLink(self.inbox)
        self.connections: dict[int, Connection] = {}
        self.lock = threading.Lock()  # handler threads and the dispatcher both send

    def send(self, replica: int, message) -> None:
        with self.lock:
            if replica in self.connections:
                try:
                    self.connections[replica].send(message)
                except OSError:  # the replica is gone; its ("gone",) is in the inbox
                    pass
            elif replica == 0:
                self.local.inbox.put(message)

    def accept(self, store: dist.Store, replicas: int) -> None:
        """Rank 0: wait for the other replicas' leaders to connect (rank 0's own replica uses `local`)."""
        if replicas == 1:
            return
        listener, key = listen()
        with listener:
            publish(store, listener.address, key)
            self.take(listener, replicas - 1)

    def take(self, listener: Listener, leaders: int) -> None:
        """Wait for `leaders` leaders to connect to `listener` (each first sends its replica number). A connection
        without the key (a port scanner, a stray client) is dropped, and the wait goes on."""
        while len(self.connections) < leaders:
            try:
                conn = _no_delay(listener.accept())
                replica = conn.recv()
            except (AuthenticationError, EOFError, OSError):
                continue
            self.connections[replica] = conn
            threading.Thread(target=self._relay, args=(replica, conn), daemon=True, name=f"link-{replica}").start()

    def _relay(self, replica: int, conn: Connection) -> None:
        try:
            while True:
                self.inbox.put((replica, conn.recv()))
        except (EOFError, OSError):
            self.inbox.put((replica, ("gone",)))


def listen() -> tuple[Listener, bytes]:
    """A listener for leaders' links on the address other nodes reach this one at, and its fresh key."""
    key = secrets.token_bytes(32)
    return Listener((_own_address(), 0), authkey=key), key


def publish(store: dist.Store, address: tuple[str, int], key: bytes) -> None:
    """Where leaders connect to, and the key they must know (only the job's ranks read the store)."""
    store.set(KEY, key)
    store.set(ADDRESS, f"{address[0]}:{address[1]}")


def connect(store: dist.Store, replica: int) -> SocketLink:
    """A leader's link to the hub (waiting for the hub's address, should it not be published yet)."""
    host, port = store.get(ADDRESS).decode().rsplit(":", 1)
    conn = _no_delay(Client((host, int(port)), authkey=store.get(KEY)))
    conn.send(replica)
    return SocketLink(conn)


def _no_delay(conn: Connection) -> Connection:
    """Every message leaves at once. With Nagle's algorithm a small message sent right after another (a leader's
    ask for work after its step's tokens) waits for the first one's acknowledgement, which the other end delays
    by up to 40 ms: every stream stalled a few steps now and then."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # the same TCP socket, through a descriptor of its own
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _own_address() -> str:
    """The address other nodes reach this one at: the interface that routes to the rendezvous host."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))))
        return s.getsockname()[0]
