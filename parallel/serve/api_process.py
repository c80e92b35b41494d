"""The server's API process: its HTTP, every request's reply and the dispatcher, in a process of its own beside
rank 0.

Streaming is Python work on every token of every stream (harmony parsing, a chunk built, framed and sent through
h11): some 80 us a chunk, and 256 streams of a fast engine make 10,000 chunks a second. In a thread of rank 0 it
held the interpreter lock against the engine loop's host work, and slowed every stream; in a process of its own
it costs the engine nothing. Every replica's leader, rank 0's too, links to this process's hub (a message a step).

Rank 0 starts it before loading the model, so a port in use or an empty API key fails at once. The API
process ignores SIGTERM and SIGINT: rank 0 gets them (from torchrun, Slurm or a terminal) and decides. The first
asks it to drain (parallel/serve/http.py's Server.drain); a second, or one before the model is up, ends the
job at once. An API process that stops serving on its own asks rank 0 to drain it; one that dies ends the job.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection

import torch.distributed as dist

from parallel.config import JobConfig
from parallel.log import error, log, log_clock, set_log_clock
from parallel.protocol.harmony import encoding
from parallel.replicas.channel import Hub, listen, publish
from parallel.serve.http import Server
from parallel.serve.tickets import Tickets

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


class ApiProcessError(Exception):
    """The API process could not start (the port, the API key): the message says why."""


class ApiProcess:
    """Rank 0's handle on the API process."""

    def __init__(self, cfg: JobConfig, context_length: int, vocab_size: int, replicas: int):
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA, no threads of rank 0's
        self.control, theirs = spawn.Pipe()
        # Not a daemon (its request preparer has worker processes): killed should rank 0 exit without waiting for it.
        self.process = spawn.Process(
            target=_serve,
            name="api-process",
            args=(cfg, context_length, vocab_size, replicas, theirs, log_clock(), os.getpid()),
        )
        self.process.start()
        atexit.register(self.process.kill)
        theirs.close()
        try:
            reply = self.control.recv()
        except EOFError:
            self.process.join()
            reply = ("error", f"the server's API process died at start (exit code {self.process.exitcode})")
        if reply[0] == "error":
            raise ApiProcessError(reply[1])
        self.address, self.key = reply[1], reply[2]
        self.serving = False
        self.lock = threading.Lock()  # the signal handler's drain thread and the watcher both send
        self.ended = threading.Event()  # the watcher has reaped the process (the only thread that joins it)

    def link_replicas(self, store: dist.Store) -> None:
        """Publish the API process's hub for the replicas' leaders; from now on it watches them, and rank 0
        watches it."""
        publish(store, self.address, self.key)
        self.serving = True
        threading.Thread(target=self._watch, daemon=True, name="api-watch").start()

    def drain(self) -> None:
        with self.lock:
            self.control.send("drain")

    def stop_now(self) -> None:
        self.process.kill()

    def wait(self) -> int:
        self.ended.wait()
        return self.process.exitcode

    def _watch(self) -> None:
        """What the API process says: it stopped serving (then drain it: the job ends as on SIGTERM rather than
        serve no one), or nothing more because it died (then the job ends now: the replicas' links went with it)."""
        try:
            while True:
                if self.control.recv() == "stopped":
                    error("the HTTP server stopped; shutting down")
                    self.drain()
        except (EOFError, OSError):
            pass
        self.process.join()
        self.ended.set()
        if self.process.exitcode:
            error(f"the server's API process died (exit code {self.process.exitcode}); shutting down")
            os._exit(1)


def _serve(
    cfg: JobConfig, context_length: int, vocab_size: int, replicas: int, control: Connection, clock: float, rank0: int
) -> None:
    """The API process: bind and check, say where its hub listens, wait for every leader, serve until told to
    drain, then wait for every replica's goodbye."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(rank0)
    set_log_clock(clock)
    try:
        server = Server(cfg, encoding(), context_length, vocab_size, on_stop=lambda: control.send("stopped"))
    except OSError as e:
        control.send(("error", f"cannot listen on {cfg.server.host}:{cfg.server.port}: {e}"))
        return
    except ValueError as e:
        control.send(("error", str(e)))
        return
    listener, key = listen()
    control.send(("ready", listener.address, key))
    hub = Hub()
    with listener:
        hub.take(listener, replicas)
    tickets = Tickets(hub, replicas)
    tickets.dispatcher.start()
    server.start(tickets)
    try:
        while control.recv() != "drain":
            pass
    except EOFError:  # rank 0 is gone: so is the job
        os._exit(1)
    server.drain()
    tickets.dispatcher.finished.wait()
    log(f"served {tickets.stats['requests']} requests")


def _die_with(parent: int) -> None:
    """Be killed when rank 0 ends, however it ends (its watchdog's os._exit, SIGKILL, the OOM killer): an orphan
    that ignores SIGTERM would hold the port, and a restarted job could not listen on it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # rank 0 ended before the line above
        os._exit(1)
