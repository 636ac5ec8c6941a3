"""One training run per workdir: a lock file that a crashed run does not leave stuck.

``<workdir>/lock.json`` names its holder: a random token, the hostname, the pid, the
process's start time (so a recycled pid is not mistaken for the holder) and a heartbeat
timestamp that a background thread of the holder refreshes every ``lease_s / 4`` seconds.
A lock is *stale*, and is taken over, when

  * its holder ran on this host and that process is gone (``os.kill(pid, 0)`` fails, or
    the pid now belongs to a process that started at another time), or
  * its heartbeat is older than ``lease_s`` (a holder on another host, or a workdir on
    ``gs://`` seen from anywhere: only the lease can tell there).

Local workdirs take the lock under an ``flock`` of ``<workdir>/.lock.mutex``, so two
launches racing for one workdir cannot both win. On ``gs://`` (through ``etils.epath``,
which has no exclusive create) the lock is written, read back after a short pause and
kept only if it still carries this run's token: two launches within that pause on one
bucket path could still both start, which a retry wrapper does not do.

Several JAX processes of one run do not lock against each other: only process 0 takes the
lock, and all processes learn its answer (``hold``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from etils import epath

LOCK_NAME = "lock.json"
DEFAULT_LEASE_S = 300.0


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir; the message (one line) names it."""


def _process_start(pid: int) -> int | None:
  """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # The command name (field 2) may hold spaces; fields after it are space-separated.
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _alive(pid: int, start: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists
    pass
  now = _process_start(pid)
  return start is None or now is None or now == start


def _own_record(token: str, lease_s: float) -> dict:
  now = time.time()
  return {"token": token, "hostname": socket.gethostname(), "pid": os.getpid(),
          "process_start": _process_start(os.getpid()), "started": now, "heartbeat": now,
          "lease_s": lease_s}


def describe(record: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("started", 0)))
  return (f"pid {record.get('pid')} on host {record.get('hostname')}, started {started}, "
          f"last heartbeat {time.time() - record.get('heartbeat', 0):.0f} s ago")


def stale_reason(record: dict, now: float | None = None) -> str | None:
  """Why the lock ``record`` no longer holds (one phrase), or None while its holder lives."""
  now = time.time() if now is None else now
  if record.get("hostname") == socket.gethostname() and isinstance(record.get("pid"), int):
    if not _alive(record["pid"], record.get("process_start")):
      return f"its holder (pid {record['pid']} on this host) is gone"
    return None
  age = now - float(record.get("heartbeat", 0))
  lease = float(record.get("lease_s", DEFAULT_LEASE_S))
  if age > lease:
    return f"its heartbeat is {age:.0f} s old (lease {lease:.0f} s)"
  return None


def _read(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (ValueError, OSError):  # half-written by a holder that died mid-write: stale
    return {}


def _write(path: epath.Path, record: dict) -> None:
  text = json.dumps(record, indent=1)
  if "://" in str(path):
    path.write_text(text)
    return
  tmp = path.with_name(f"{path.name}.{record['token']}.tmp")
  try:
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees half a lock
  finally:
    if tmp.exists():  # the write failed (a full disk): leave no debris
      tmp.unlink()


class WorkdirLock:
  """The lock of one workdir, held by this process from ``acquire`` to ``release``."""

  def __init__(self, workdir: str | epath.PathLike, lease_s: float = DEFAULT_LEASE_S,
               log: Callable[[str], None] = print, confirm_delay_s: float = 1.0):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.lease_s, self.log, self.confirm_delay_s = lease_s, log, confirm_delay_s
    self.token = uuid.uuid4().hex
    self.record: dict | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock (or a stale one over) and starts the heartbeat; raises
    WorkdirLockedError naming the holder if another live run has it."""
    if "://" in str(self.path):
      self._acquire_remote()
    else:
      self._acquire_local()
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name="workdir-lock-heartbeat")
    self._thread.start()
    return self

  def _refuse(self, record: dict):
    raise WorkdirLockedError(
        f"workdir {self.path.parent} is in use by another run ({describe(record)}; lock "
        f"file {self.path}). Wait for it to finish or stop it, or use another --workdir; a "
        "lock whose holder died is taken over automatically.")

  def _take(self, previous: dict | None) -> None:
    if previous is not None:
      why = stale_reason(previous) if previous else "it is unreadable"
      self.log(f"Taking over the stale lock {self.path} ({why}; it was "
               f"{describe(previous) if previous else 'empty'}).")
    self.record = _own_record(self.token, self.lease_s)
    _write(self.path, self.record)

  def _acquire_local(self) -> None:
    import fcntl

    with open(self.path.parent / ".lock.mutex", "a") as mutex:
      fcntl.flock(mutex, fcntl.LOCK_EX)  # released when the file closes or we die
      previous = _read(self.path)
      if previous and stale_reason(previous) is None:
        self._refuse(previous)
      self._take(previous)

  def _acquire_remote(self) -> None:
    previous = _read(self.path)
    if previous and stale_reason(previous) is None:
      self._refuse(previous)
    self._take(previous)
    time.sleep(self.confirm_delay_s)  # another launcher's write would land by now
    now = _read(self.path)
    if not now or now.get("token") != self.token:
      self.record = None
      self._refuse(now or {})

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.lease_s / 4):
      try:
        current = _read(self.path)
        if current and current.get("token") != self.token:
          self.log(f"warning: the lock {self.path} was taken over by another run "
                   f"({describe(current)}); this run no longer holds its workdir.")
          return
        self.record = dict(self.record, heartbeat=time.time())
        _write(self.path, self.record)
      except OSError:  # a full disk or a network blip: try again at the next beat
        pass

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still this run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if self.record is None:
      return
    with contextlib.suppress(OSError):
      current = _read(self.path)
      if current and current.get("token") == self.token:
        self.path.unlink()
    self.record = None


# The workdirs this process holds (the lock on process 0, None on the others), so that a
# caller may take the lock early (before loading data) and the training loop's own
# ``hold`` of the same workdir is a no-op on every process alike.
_HELD: dict[str, WorkdirLock | None] = {}


def _key(workdir: str | epath.PathLike) -> str:
  path = epath.Path(workdir)
  return str(path.resolve() if "://" not in str(path) else path)


@contextlib.contextmanager
def hold(workdir: str | epath.PathLike, log: Callable[[str], None] = print,
         lease_s: float = DEFAULT_LEASE_S) -> Iterator[WorkdirLock | None]:
  """Holds ``workdir``'s lock for the block (re-entrant within a process). With several
  JAX processes only process 0 takes it and every process raises WorkdirLockedError if it
  could not (all of them stop at the same point, before any collective of the run)."""
  import jax

  key = _key(workdir)
  if key in _HELD:
    yield _HELD[key]
    return
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, lease_s=lease_s, log=log).acquire()
    except Exception as e:  # noqa: BLE001  (raised below, after the others heard of it)
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 "
                                 f"could not lock {epath.Path(workdir) / LOCK_NAME}).")
  if error is not None:
    raise error
  _HELD[key] = lock
  try:
    yield lock
  finally:
    del _HELD[key]
    if lock is not None:
      lock.release()
