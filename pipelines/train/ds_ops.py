"""DeepSpeed's shared-memory comm op (deepspeed_shm_comm), built once and then only loaded.

DeepSpeed builds the op with torch's C++-extension loader in the first process of each
machine that initialises its CPU backend, into ~/.cache/torch_extensions, and every later
process loads it, asking `ninja` whether anything is out of date. torch runs the first
`ninja` on PATH, and ninja versions hash the build commands in their log differently
(1.11 and 1.13 do): where PATH finds the system's ninja in one process and the
environment's in another (a shell against a Ray worker), each one rebuilds the op the
other built, about a minute on 2 cores each time, under a lock every other worker waits
on. Training therefore puts the ninja installed with DeepSpeed (pinned by constraints.txt)
first on its PATH before it starts DeepSpeed's backend; the Makefile builds the op
through here too:

    python -m uniloom.pipelines.train.ds_ops
"""

from __future__ import annotations

import os


def pin_ninja() -> str:
    """Put the directory of the `ninja` package's binary first on this process's PATH (what
    torch and the processes it starts find); return that directory."""
    import ninja

    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if path[:1] != [ninja.BIN_DIR]:
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, *path])
    return ninja.BIN_DIR


def build_shm_op():
    """DeepSpeed's shm comm op, built with the pinned ninja where it is not built yet."""
    from deepspeed.comm.torch import build_shm_op as deepspeed_build

    pin_ninja()
    return deepspeed_build()


if __name__ == "__main__":
    build_shm_op()
