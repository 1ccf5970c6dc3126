"""Processes as /proc shows them, and the ``/dev/shm`` regions that a launch names after its launcher.

Both the launcher and its supervisor (mixsup.serving.launcher, mixsup.serving.supervisor) use these; this
module imports neither of them.

- Processes are read from ``/proc`` (state, parent, process group, start time), so a pid together with its
  start time names one process for good, even after the pid is reused, and a zombie counts as gone.
- Each launch gives Triton's python backend its own shared-memory prefix that names the launcher's pid and
  start time (:func:`new_shm_prefix`), so its ``/dev/shm`` regions are removed after the server stops, and a
  later launch removes the regions of launchers that are gone, and only those (:func:`sweep_stale_shm_regions`).
"""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import sys
from pathlib import Path

from mixsup.shm_names import client_region_owner

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "mixsup_serve_"
#: Linux prctl options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_LIBC: ctypes.CDLL | None = None


# ------------------------------------------------------------------------------------------ processes (/proc)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, pgrp, ...), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    return text.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (with the pid, it names one process for good)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (zombies do not), and is the process that started at ``start_time`` if given."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def _processes(field: int, value: int) -> list[int]:
    """Live processes whose stat field ``field`` (1 = ppid, 2 = process group) equals ``value``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields and fields[0] not in ("Z", "X") and fields[field] == str(value):
                found.append(int(entry))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``: Triton and its python-backend stubs."""
    return _processes(2, pgid)


def live_children(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``."""
    return _processes(1, pid)


def describe_exit(code: int | None) -> str:
    """A process's exit status in words: "code 1", "SIGKILL"."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def prctl(option: int, value: int) -> bool:
    """Linux prctl(option, value); False where it is unavailable or fails."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return False
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    return _LIBC.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero) == 0


# ------------------------------------------------------------------------------------------ shared memory


def new_shm_prefix(pid: int | None = None) -> str:
    """A python-backend shared-memory prefix unique to one launch, naming its owner: pid, start time, random.

    The start time tells a later launch whether the owner still runs even after its pid was reused.
    """
    pid = os.getpid() if pid is None else pid
    return f"{SHM_PREFIX}{pid}_{process_start_time(pid) or 0}_{secrets.token_hex(4)}_"


# Owner pid, then (since the start time was added) the owner's start time, which is followed by the 8 random
# hex digits and '_'; regions of older launches carry only the pid.
_SHM_OWNER = re.compile(rf"^{SHM_PREFIX}(\d+)_(?:(\d+)_(?=[0-9a-f]{{8}}_))?")


def shm_owner(name: str) -> tuple[int, int | None] | None:
    """(pid, start time or None) of the launcher or client that owns a ``/dev/shm`` region; None if not a mixsup
    one. Client regions carry no start time: a live process with the pid keeps them."""
    match = _SHM_OWNER.match(name)
    if match:
        return int(match.group(1)), int(match.group(2)) if match.group(2) else None
    # A client keeps its regions while it runs, so a killed one leaves them behind (mixsup.shm_names).
    client = client_region_owner(name)
    return None if client is None else (client, None)


def remove_shm_regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove the regions whose names start with ``prefix``; returns those removed."""
    removed = []
    for region in sorted(shm_dir.glob(prefix + "*")) if shm_dir.is_dir() else []:
        try:
            region.unlink()
            removed.append(region)
        except FileNotFoundError:
            pass
    return removed


def sweep_stale_shm_regions(shm_dir: Path = SHM_DIR) -> dict[Path, int]:
    """Remove mixsup regions whose launcher or client is gone (e.g. SIGKILLed); those of running ones stay.

    Returns {removed region: its size in bytes}.
    """
    removed = {}
    for region in sorted(shm_dir.iterdir()) if shm_dir.is_dir() else []:
        owner = shm_owner(region.name)
        if owner is None or process_alive(*owner):
            continue
        try:
            size = region.stat().st_size
            region.unlink()
            removed[region] = size
        except (FileNotFoundError, PermissionError):  # gone meanwhile, or another user's (sticky /dev/shm)
            pass
    return removed
