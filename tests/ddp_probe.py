"""One rank of a ``torchrun`` training job that leaves digests of its weights in the run folder, for the DDP test.

``torchrun --nproc_per_node 2 tests/ddp_probe.py RECIPE --data DIR --out DIR ...`` takes ``mixsup-train``'s
arguments. Each rank writes ``OUT/weights-rank<R>.json`` with the SHA-256 of its parameters as built (``init``)
and after training (``trained``). Ranks draw different crops, so their trained digests agree only if
DistributedDataParallel averaged their gradients (tests/test_distributed.py).

The trainer is not instrumented for this: the probe wraps ``trainer.distribute`` to see which modules a rank
trains, and hashes them after ``train`` returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from torch import nn

import mixsup.training.trainer as trainer
from mixsup.training.cli import main as train_main


def parameters_sha256(modules: nn.Module) -> str:
    """Digest of the parameters by name. Buffers are left out on purpose: DDP does not average BatchNorm running
    statistics, so after the last step each rank holds the statistics of its own crops."""
    digest = hashlib.sha256()
    for name, parameter in sorted(modules.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_rank(argv: Sequence[str]) -> int:
    """Train as ``mixsup-train argv`` would, recording this rank's weight digests before and after."""
    built: list[nn.Module] = []
    digests: dict[str, str] = {}
    real_distribute = trainer.distribute

    def watching_distribute(modules: nn.ModuleDict, parallel: trainer.Distributed) -> dict[str, nn.Module]:
        built.append(modules)
        digests["init"] = parameters_sha256(modules)
        return real_distribute(modules, parallel)

    trainer.distribute = watching_distribute
    code = train_main(argv)
    if built:
        digests["trained"] = parameters_sha256(built[0])
    out = Path(argv[list(argv).index("--out") + 1])
    (out / f"weights-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(digests))
    return code


if __name__ == "__main__":
    sys.exit(run_rank(sys.argv[1:]))
