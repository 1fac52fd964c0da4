"""Test helper: run ``ssd-run`` commands in forked children of one warm interpreter.

Importing Keras and torch takes most of a CLI start on a small machine, so
tests/test_resilience.py starts this script once; it imports ``ssd_keras.cli`` (and with
it Keras and torch, running no tensor op) and then serves requests, one JSON object per
line on stdin: ``{"argv": [...], "stdout": path, "stderr": path}``. For each it forks a
child that runs ``ssd_keras.cli.main(argv)`` exactly as ``python -m ssd_keras`` would,
with stdout/stderr redirected to the given files, answers ``{"pid": N}`` at once and
``{"exit": code}`` when the child is gone (``-signum`` if a signal killed it).
"""

import json
import os
import sys
import traceback

import ssd_keras.train  # noqa: F401  (Keras, torch, the Flexi-UNet: imported once, here)
from ssd_keras.cli import main


def _child(argv, stdout, stderr) -> int:
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request["argv"], request["stdout"], request["stderr"]))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
