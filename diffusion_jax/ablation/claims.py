"""Claim files: several workers (processes or hosts on a shared POSIX filesystem) take
arms of one sweep without running any twice.

A claim is ``<dir>/claim.json``, created with ``O_CREAT | O_EXCL`` (atomic on local
disks and NFS), holding the owner's host, pid and a heartbeat the owner refreshes from a
background thread. A claim is *stale*, and another worker takes it over, when its owner
was on this host and its pid is gone (kill -9), or when its heartbeat is older than the
lease (an owner on another host that died). A take-over removes the stale file under a
take-over lock (a directory, created atomically) and then claims with ``O_EXCL`` as
usual, so two workers that both saw it stale never both run the arm.

What a finished arm leaves (its ``eval.json``) is checked by the caller before claiming;
a finished arm is never claimed.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import threading
import time
import uuid

CLAIM_FILE = "claim.json"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def read_claim(directory: str | os.PathLike) -> dict | None:
  """The claim's record, or None if unclaimed (or unreadable, e.g. half-written)."""
  try:
    return json.loads((pathlib.Path(directory) / CLAIM_FILE).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def is_stale(record: dict, lease_s: float, now: float | None = None) -> bool:
  now = time.time() if now is None else now
  if record.get("host") == socket.gethostname() and not _pid_alive(int(record["pid"])):
    return True
  return now - float(record.get("heartbeat", 0.0)) > lease_s


class Claim:
  """A held claim; refreshes its heartbeat until ``release``."""

  def __init__(self, directory: pathlib.Path, record: dict, lease_s: float):
    self.directory, self.record, self.lease_s = directory, record, lease_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  @property
  def path(self) -> pathlib.Path:
    return self.directory / CLAIM_FILE

  def _beat(self) -> None:
    while not self._stop.wait(self.lease_s / 4):
      self.record["heartbeat"] = time.time()
      tmp = self.directory / f".claim-{self.record['token']}.tmp"
      tmp.write_text(json.dumps(self.record))
      if (read_claim(self.directory) or {}).get("token") != self.record["token"]:
        tmp.unlink(missing_ok=True)  # taken over (we looked dead): stop claiming
        return
      os.replace(tmp, self.path)

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    if (read_claim(self.directory) or {}).get("token") == self.record["token"]:
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> Claim:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def try_claim(directory: str | os.PathLike, *, lease_s: float = 120.0,
              worker: str = "") -> Claim | None:
  """Claims ``directory`` (created if missing) for this process, or returns None when a
  live owner holds it. A stale claim is taken over."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / CLAIM_FILE
  record = {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker,
            "started": time.time(), "heartbeat": time.time(), "token": uuid.uuid4().hex}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      held = read_claim(directory)
      if held is not None and not is_stale(held, lease_s):
        return None
      if held is None and time.time() - _mtime(path) < 5.0:
        return None  # being written right now
      if not _take_over(directory, lease_s):
        return None
      continue
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(record))
    return Claim(directory, record, lease_s)
  return None


def _take_over(directory: pathlib.Path, lease_s: float) -> bool:
  """Removes a stale claim under a take-over lock (a directory, made atomically), so two
  workers that both saw the claim stale cannot remove a claim the other just made."""
  lock = directory / ".claim-takeover"
  try:
    lock.mkdir()
  except FileExistsError:
    if time.time() - _mtime(lock) > 30.0:  # its maker died in the few lines below
      lock.rmdir()
    return False
  try:
    held = read_claim(directory)  # again, under the lock
    if held is not None and not is_stale(held, lease_s):
      return False
    (directory / CLAIM_FILE).unlink(missing_ok=True)
    return True
  finally:
    lock.rmdir()


def _mtime(path: pathlib.Path) -> float:
  try:
    return path.stat().st_mtime
  except FileNotFoundError:
    return 0.0


def write_json(path: str | os.PathLike, record: dict) -> None:
  """Writes ``record`` to ``path`` atomically (a reader sees the old file or the new one)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(record, indent=2, default=str))
  os.replace(tmp, path)


def run_once(workdir: str | os.PathLike, done_file: str, build) -> dict | None:
  """The record in ``workdir/done_file`` if it exists; else, under ``workdir``'s claim,
  ``build()`` -> record, written there and returned; None if another worker holds the
  claim (try again later). A ``build`` that raises leaves no record (and the claim freed)."""
  workdir = pathlib.Path(workdir)
  done = workdir / done_file
  if done.exists():
    return json.loads(done.read_text())
  claim = try_claim(workdir / "claim")
  if claim is None:
    return None
  with claim:
    if done.exists():  # finished by another worker between the check and the claim
      return json.loads(done.read_text())
    record = build()
    write_json(done, record)
    return record
