"""How ``mixsup-client`` names the system shared-memory regions it registers with Triton, in one place: the client
makes the names and ``mixsup-serve`` reads the owner's pid back from them to sweep the regions of killed clients."""
from __future__ import annotations

import re
import secrets

CLIENT_SHM_PREFIX = "mixsup_client_"
_CLIENT_SHM_OWNER = re.compile(rf"^{CLIENT_SHM_PREFIX}(\d+)_[0-9a-f]{{8}}_")


def client_region_tag(pid: int) -> str:
    """``mixsup_client_<pid>_<8 random hex digits>``: a client's regions are this tag plus ``_<role>``."""
    return f"{CLIENT_SHM_PREFIX}{pid}_{secrets.token_hex(4)}"


def client_region_owner(name: str) -> int | None:
    """The pid of the client that made region ``name``, or None if a client did not make it."""
    match = _CLIENT_SHM_OWNER.match(name)
    return int(match.group(1)) if match else None
