"""``mixsup-serve``: start Triton on a model repository, wait until it is ready, stop cleanly on Ctrl-C/SIGTERM.

Exit codes: 0 stopped on request, 2 bad usage (e.g. no model repository), 3 a port is in use or the server did
not become ready, 1 the server stopped on its own or anything else.

Triton never outlives this command: a supervisor process between the two stops it (and its python-backend
stubs) when this command exits in any way, SIGKILL included (see mixsup.serving.supervisor).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

import mixsup
from mixsup.errors import EXIT_OK, InputError, MixsupError, add_debug_flag, run_command
from mixsup.serving.launcher import RESTRICTED_APIS, ServerStartupError, TritonProcess
from mixsup.serving.processes import describe_exit

PROG = "mixsup-serve"
LOG_TAIL_LINES = 20


def default_model_repository() -> Path | None:
    """``model_repository/`` at the root of a source checkout, if this mixsup runs from one."""
    candidate = Path(mixsup.__file__).resolve().parents[1] / "model_repository"
    return candidate if candidate.is_dir() else None


def resolve_model_repository(path: str | None) -> Path:
    if path is None:
        found = default_model_repository()
        if found is None:
            raise InputError("no model repository found next to the mixsup sources; pass --model-repository DIR")
        return found
    repository = Path(path)
    if not repository.is_dir():
        raise InputError(f"{repository}: no such model repository folder")
    return repository


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", metavar="DIR",
                        help="Triton model repository (default: model_repository/ of the source checkout)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind gRPC, HTTP and metrics to (default: loopback only); any other "
                             f"address closes Triton's {', '.join(RESTRICTED_APIS)} APIs")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--startup-timeout", type=float, default=120.0, metavar="S",
                        help="seconds to wait for every model to load (default 120)")
    parser.add_argument("--log-file", metavar="F", help="server log (default: a temporary file, printed)")
    add_debug_flag(parser)
    return parser


def print_log_tail(server: TritonProcess) -> None:
    tail = server.log_tail(LOG_TAIL_LINES).rstrip("\n")
    if tail:
        print(f"--- last {LOG_TAIL_LINES} lines of {server.log_path} ---\n{tail}\n---", file=sys.stderr)


def serve(args: argparse.Namespace) -> int:
    repository = resolve_model_repository(args.model_repository)
    stop_requested = threading.Event()

    def request_stop(signum, frame) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = TritonProcess(
        repository, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
        metrics_port=args.metrics_port, log_file=args.log_file, verbose=args.debug,
    )
    try:
        server.start()
        if server.swept_shm_regions:
            size = sum(server.swept_shm_regions.values())
            print(f"{PROG}: removed {len(server.swept_shm_regions)} shared-memory regions "
                  f"({size / 2**20:.1f} MiB) of launchers that are gone", flush=True)
        print(f"{PROG}: starting Triton on {repository} (pid {server.pid}, supervisor {server.supervisor_pid}, "
              f"log {server.log_path})", flush=True)
        if server.restricted:
            print(f"{PROG}: listening on {args.host}, beyond loopback: Triton's {', '.join(RESTRICTED_APIS)} "
                  "APIs are closed", flush=True)
        try:
            ready = server.wait_ready(args.startup_timeout, stop_requested)
        except ServerStartupError:
            print_log_tail(server)
            raise
        if ready:
            print(f"{PROG}: ready on grpc {server.grpc_url}, http {server.http_url.split('//')[1]}, "
                  f"{count_ready(server)} models", flush=True)
            while not stop_requested.wait(0.5):
                code = server.poll()
                if code is not None:
                    print_log_tail(server)
                    raise MixsupError(exit_message(server, code))
        print(f"{PROG}: stopping", flush=True)
        return EXIT_OK
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_message(server: TritonProcess, code: int) -> str:
    """Why a server that was ready is gone, in one line."""
    if server.supervisor_lost:
        return (f"the supervisor of tritonserver (pid {server.supervisor_pid}) died ({describe_exit(code)}); "
                f"tritonserver (pid {server.pid}) and its stubs were killed (log: {server.log_path})")
    return (f"tritonserver stopped on its own ({describe_exit(code)}); its stubs are gone too "
            f"(log: {server.log_path})")


def count_ready(server: TritonProcess) -> int | str:
    try:
        return sum(state == "READY" for state in server.model_states().values())
    except (OSError, ValueError):
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, build_parser(), serve, argv)


if __name__ == "__main__":
    sys.exit(main())
