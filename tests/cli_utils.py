"""Running ``mixsup-client`` in-process from tests."""
from __future__ import annotations

from mixsup.clients.cli import main


def run_cli(capsys, *argv) -> tuple[int | str | None, str, str]:
    """Run ``mixsup-client argv`` in-process; argparse's usage errors exit through SystemExit like the script.
    Returns (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
