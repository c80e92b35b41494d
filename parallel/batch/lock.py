"""One job writes an output at a time: rank 0 holds a lock on `<output>.lock` from before it reads the output
(resume) to its exit, and a job started on an output that another job is writing stops before any model loads,
naming that job (a Slurm job resubmitted while the first still runs would otherwise write every record twice).

The lock is a POSIX record lock (fcntl F_SETLK, through fcntl.lockf), chosen because it is the lock that shared
file systems make hold across nodes:

- NFS: NFSv3 carries these locks to the server through NLM (lockd, with statd freeing the locks of a client that
  reboots); NFSv4 has them in the protocol itself, held under the client's lease, so the locks of a client that
  died lapse when its lease runs out (90 s by default). A mount with `nolock` (or `local_lock=posix|all`) keeps
  them on one node: don't write data.output there.
- Lustre: coherent across client nodes with the `flock` mount option (the default since Lustre 2.13, per the
  Lustre wiki's "Mounting a Lustre File System on Client Nodes"); `localflock` holds on one node only, and
  `noflock` refuses them (ENOSYS), which stops the job with a message saying so.

The kernel drops a process's locks when it ends, however it ends (kill -9 included), so a job that died never
blocks its resume; the lock file stays where it is (unlinking it would race with a job opening it to lock). A
POSIX lock is the process's: closing any descriptor of the file in that process drops it, so nothing else in the
process opens `<output>.lock` once it is held (check_paths opens it before, and lets go of it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time

LOCK_SUFFIX = ".lock"
# What locking fails with where another process holds the lock, and where the file system has no locks at all.
HELD = {errno.EACCES, errno.EAGAIN}
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
# How long a refused job waits for a holder that has just locked to name itself.
NAME_WAIT_S = 2.0


class OutputError(Exception):
    """What stops a job at its output, said in one line that says what to do: another job is writing it, its file
    system has no locks, or a write failed (a full disk)."""


def lock_output(output: str) -> int:
    """Lock `<output>.lock` for this process and write who holds it there (host, pid, since when); the open
    descriptor, to keep open for as long as the job writes. OutputError where another job holds it or the file
    system has no locks; OSError where the lock file cannot be written (a full disk)."""
    path = output + LOCK_SUFFIX
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd) if e.errno in HELD else ""
        os.close(fd)
        if e.errno in HELD:
            raise OutputError(
                f"another job is writing {output} ({holder or 'a job that has not named itself yet'}; its lock: "
                f"{path}). Wait for it to end or stop it, then run this again to resume (a job that died holds "
                "nothing); or give this job another data.output"
            ) from None
        if e.errno in NO_LOCKS:
            raise OutputError(
                f"the file system of {output} does not support file locks ({e.strerror}), which keep two jobs from "
                "writing one output: mount it with locks that hold across nodes (Lustre: the `flock` mount "
                "option), or write data.output to a file system that has them"
            ) from None
        raise
    try:
        _write_holder(fd)
    except OSError as e:
        os.close(fd)  # and with it the lock
        raise OSError(e.errno, e.strerror, path) from None
    return fd


def _write_holder(fd: int) -> None:
    job = os.environ.get("SLURM_JOB_ID")
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    holder = f"pid {os.getpid()} on host {socket.gethostname()}{f' (Slurm job {job})' if job else ''}, since {since}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    os.fsync(fd)  # for a job on another node to read


def _read_holder(fd: int) -> str:
    """The holder's line; a holder that has only just locked is given a moment to write it."""
    deadline = time.monotonic() + NAME_WAIT_S
    while True:
        holder = os.pread(fd, 1024, 0).decode(errors="replace").strip()
        if holder or time.monotonic() > deadline:
            return holder
        time.sleep(0.1)
