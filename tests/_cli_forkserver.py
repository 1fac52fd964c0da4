"""Test helper: run ``ssd-run`` commands in forked children of one warm interpreter.

Importing Keras and torch takes most of a CLI start on a small machine, so
tests/test_resilience.py starts this script once; it imports ``ssd_keras.cli`` (and with
it Keras and torch, running no tensor op) and then serves requests, one JSON object per
line on stdin: ``{"argv": [...], "stdout": path, "stderr": path}``. For each it forks a
child that runs ``ssd_keras.cli.main(argv)`` exactly as ``python -m ssd_keras`` would,
with stdout/stderr redirected to the given files, answers ``{"pid": N}`` at once and
``{"exit": code}`` when the child is gone (``-signum`` if a signal killed it).

A request may also name signals the child sends itself at chosen points, so that a test
of signal handling does not depend on when a signal from outside happens to land:
``"signals": ["train-step#3:SIGINT", "forward#3:SIGTERM"]`` means SIGINT as the 3rd
training step starts, SIGTERM in the 3rd forward pass. Points (``#n``: the n-th call):
``train-step`` (``Trainer.train_step``), ``forward`` (``Trainer._loss_fn``, inside a
``try/except:`` that swallows everything, as third-party code in a forward pass may),
``checkpoint-write`` (in ``np.savez`` of a checkpoint, after the data is written and
before the file is renamed into place), ``data-close`` (``ImageBatches.close``). Each
fires once and says so on stderr (``test hook: ...``).
"""

import json
import os
import signal
import sys
import traceback

import ssd_keras.train  # noqa: F401  (Keras, torch, the Flexi-UNet: imported once, here)
from ssd_keras.cli import main


def _signal_hooks(specs) -> None:
    """Patch the named points (see above) to send the given signals; child only."""
    import numpy as np

    from ssd_keras.data.batches import ImageBatches
    from ssd_keras.train import Trainer

    pending = []
    for spec in specs:
        where, name = spec.split(":")
        point, nth = where.split("#")
        pending.append([point, int(nth), signal.Signals[name], spec])
    calls = {}

    def fire(point) -> None:
        calls[point] = calls.get(point, 0) + 1
        for p in [p for p in pending if p[0] == point and p[1] == calls[point]]:
            pending.remove(p)
            os.write(2, f"test hook: {p[3]}\n".encode())
            signal.raise_signal(p[2])  # Python runs the handler before this returns

    train_step, loss_fn, close = Trainer.train_step, Trainer._loss_fn, ImageBatches.close
    savez = np.savez

    def hooked_train_step(self, *args, **kwargs):
        fire("train-step")
        return train_step(self, *args, **kwargs)

    def hooked_loss_fn(self, *args, **kwargs):
        try:
            fire("forward")
        except:  # noqa: E722 (swallow everything, as Keras' Functional input check does)
            pass
        return loss_fn(self, *args, **kwargs)

    def hooked_savez(file, *args, **kwargs):
        savez(file, *args, **kwargs)
        fire("checkpoint-write")

    def hooked_close(self):
        fire("data-close")
        return close(self)

    Trainer.train_step, Trainer._loss_fn, ImageBatches.close = (
        hooked_train_step, hooked_loss_fn, hooked_close)
    np.savez = hooked_savez  # what ssd_keras.checkpoint writes checkpoints with


def _child(argv, stdout, stderr, signals=()) -> int:
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        if signals:
            _signal_hooks(signals)
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
            os._exit(_child(request["argv"], request["stdout"], request["stderr"],
                            request.get("signals", ())))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
