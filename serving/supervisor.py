"""The supervisor between the launcher and tritonserver: it makes sure no server outlives its launcher.

A launch never leaves a server behind. The process tree is::

    launcher (TritonProcess)  --stdin pipe-->  supervisor (own session)  -->  tritonserver (own group)  -->  stubs

- The supervisor (``python -m mixsup.serving.supervisor SPEC_JSON``, started by mixsup.serving.launcher) reads
  a pipe whose only writer is the launcher: end-of-file means the launcher is gone, however it died (SIGKILL
  included) and whichever of its threads started the server. It also watches its parent pid as a second line
  of defence. It then stops Triton.
- Triton gets ``PR_SET_PDEATHSIG`` (SIGTERM) tied to the supervisor, which is single-threaded, so the
  parent-death signal cannot fire early because some thread exited. If the supervisor itself is killed, Triton
  shuts down and the launcher, if alive, kills Triton's process group.
- Triton runs in its own process group and its python-backend stubs inherit it. The supervisor is a child
  subreaper, so stubs orphaned by Triton's death become its children: when Triton exits for any reason, it
  SIGKILLs the group (stubs may ignore SIGTERM), reaps every orphan, and only then reports Triton's exit code.
- Once everything is gone it removes the launch's ``/dev/shm`` regions (their prefix is in the spec, see
  mixsup.serving.processes) and its runtime directory.

It speaks to the launcher in lines on stdout: ``pid N`` (or ``error MESSAGE``) once tritonserver is started,
and ``exit CODE`` at the end; its own messages go to stderr, which is the server log. It imports only
mixsup.serving.processes, so it starts quickly and never depends on the launcher's code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Sequence

from mixsup.serving.processes import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    describe_exit,
    group_members,
    live_children,
    prctl,
    remove_shm_regions,
)

SUPERVISOR_MODULE = "mixsup.serving.supervisor"
#: How long Triton waits for in-flight requests on SIGTERM (the launcher passes it to tritonserver). Triton 2.51
#: never releases an ensemble request whose parallel step failed (measured), so shutdown after such a request
#: always waits this long.
EXIT_TIMEOUT_S = 15
#: Grace beyond EXIT_TIMEOUT_S before the supervisor kills the server's process group.
KILL_GRACE_S = 15.0
#: Grace for Triton when the launcher is gone: nobody waits for this server any more, and a restart needs its
#: ports, so in-flight requests get a few seconds, not EXIT_TIMEOUT_S (an idle server stops in 3-5 s).
ORPHAN_GRACE_S = 5.0
#: How long the supervisor waits for SIGKILLed processes to disappear (one stuck in the kernel takes a while).
REAP_TIMEOUT_S = 10.0
#: How often the supervisor looks at the server, its parent and the launcher's pipe.
WATCH_INTERVAL_S = 0.2


@dataclasses.dataclass
class SupervisorSpec:
    """What the supervisor needs: the server command and what to clean up after it."""

    command: list[str]
    launcher_pid: int
    shm_prefix: str
    runtime_dir: str | None = None
    #: SIGTERM -> SIGKILL grace when the launcher asks to stop.
    stop_timeout: float = EXIT_TIMEOUT_S + KILL_GRACE_S
    #: SIGTERM -> SIGKILL grace when the launcher is gone.
    orphan_grace: float = ORPHAN_GRACE_S

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SupervisorSpec":
        return cls(**json.loads(text))


def _say(message: str) -> None:
    """A supervisor message, into the server log (the supervisor's stderr)."""
    try:
        print(f"mixsup-serve supervisor (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _report(line: str) -> None:
    """One protocol line to the launcher; a launcher that is gone cannot read it, which is fine."""
    try:
        os.write(1, (line + "\n").encode())
    except OSError:
        pass


def _server_child_setup(supervisor_pid: int) -> None:
    """Runs in the forked child before exec of tritonserver (the supervisor is single-threaded: safe)."""
    os.setpgid(0, 0)  # its own group, inherited by the stubs, so one killpg reaches them all
    # SIGTERM, not SIGKILL: if the supervisor is killed, Triton still stops its stubs on the way out.
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor_pid:  # the supervisor died before the signal was armed
        os._exit(1)


def _has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it: its pid, hence its process group id, stays
    reserved until it is reaped, so a later killpg cannot hit a stranger that reused the number."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _watch(pid: int, launcher_pid: int, stop_requested: list, lifeline: int = 0) -> str:
    """Block until the server exits ("exited"), a stop is requested ("stop") or the launcher is gone."""
    while True:
        if stop_requested:
            return "stop"
        if _has_exited(pid):
            return "exited"
        # The launcher's pipe is the main signal; the parent pid also catches a launcher whose pipe lives on in
        # a child it forked without exec.
        if os.getppid() != launcher_pid:
            return "launcher gone"
        readable, _, _ = select.select([lifeline], [], [], WATCH_INTERVAL_S)
        if readable and not os.read(lifeline, 4096):
            return "launcher gone"


def _terminate(pid: int, grace: float) -> None:
    """SIGTERM the server and give it ``grace`` seconds to exit (it stops its stubs and frees its memory)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while not _has_exited(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _reap_orphans(pgid: int, timeout: float = REAP_TIMEOUT_S) -> list[int]:
    """SIGKILL and reap what is left of the server's group; returns the pids still alive after ``timeout``.

    As a child subreaper the supervisor inherits the stubs a dead Triton orphaned, so it can both kill them and
    wait until they are really gone (not only signalled).
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout
    while True:
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        survivors = sorted(set(group_members(pgid)) | set(live_children(me)))
        if not survivors or time.monotonic() >= deadline:
            return survivors
        for pid in live_children(me):  # surely ours; group members were SIGKILLed while the pgid was held
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def supervise(spec: SupervisorSpec, lifeline: int = 0) -> int:
    """Run tritonserver until it exits, the launcher asks to stop (SIGTERM) or the launcher is gone.

    Reports ``pid N`` (or ``error MESSAGE``) and finally ``exit CODE`` (Popen's convention, negative for a
    signal) on stdout, once the server, its stubs and its shared memory are all gone.
    """
    stop_requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop_requested.append(number))
    if not prctl(PR_SET_CHILD_SUBREAPER, 1):
        _say("not a child subreaper (not Linux?): stubs orphaned by a dead tritonserver are killed, not reaped")
    me = os.getpid()
    try:
        server = subprocess.Popen(
            spec.command, stdin=subprocess.DEVNULL, stdout=2, stderr=2,
            preexec_fn=lambda: _server_child_setup(me),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        _report(f"error cannot run {spec.command[0]}: {exc}")
        _clean_up(spec)
        return 1
    _report(f"pid {server.pid}")
    reason = _watch(server.pid, spec.launcher_pid, stop_requested, lifeline)
    if reason == "stop":
        _terminate(server.pid, spec.stop_timeout)
    elif reason == "launcher gone":
        _say(f"the launcher (pid {spec.launcher_pid}) is gone: stopping tritonserver (pid {server.pid})")
        _terminate(server.pid, spec.orphan_grace)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # whatever is left: a hung server, stubs that ignore SIGTERM
    except (ProcessLookupError, PermissionError):
        pass
    code = server.wait()
    survivors = _reap_orphans(server.pid)
    if survivors:
        _say(f"processes of tritonserver's group survived SIGKILL: {survivors}")
    if reason == "exited":
        _say(f"tritonserver (pid {server.pid}) exited on its own ({describe_exit(code)}); its stubs are gone")
    _clean_up(spec)
    _report(f"exit {code}")
    return 0 if code == 0 else 1


def _clean_up(spec: SupervisorSpec) -> None:
    remove_shm_regions(spec.shm_prefix)
    if spec.runtime_dir:
        shutil.rmtree(spec.runtime_dir, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """``python -m mixsup.serving.supervisor SPEC_JSON`` (started by TritonProcess, not by hand)."""
    if len(argv) != 1:
        print(f"usage: python -m {SUPERVISOR_MODULE} SPEC_JSON", file=sys.stderr)
        return 2
    return supervise(SupervisorSpec.from_json(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
