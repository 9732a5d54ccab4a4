"""Test-only entry point for tests/test_rank_failure.py, started by torchrun in place of
train.py or dafusion.py: `rank_failure_worker.py HOW SCRIPT ARGS...`.

Every rank writes its process id to $RANK_FAILURE_DIR/pid-<rank> (the test checks that each
one has ended), then runs SCRIPT's main through data.run_command as the script itself does.
HOW says what goes wrong, on rank 1 only, at its second training step (train.train_step):
  none   nothing injected (the error, if any, is a real one of the arguments)
  raise  a RunError, as a diverged loss would raise
  kill   SIGKILL of its own process: it prints nothing and runs no cleanup
The moment of the failure goes to $RANK_FAILURE_DIR/failed-at (time.time()), so that the test
measures how long the other rank takes to end from then."""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dafusion  # noqa: E402 (after the project folder is on the path)
import data  # noqa: E402
import train  # noqa: E402

HOW, SCRIPT = sys.argv[1], sys.argv[2]
FOLDER = os.environ["RANK_FAILURE_DIR"]
with open(os.path.join(FOLDER, f"pid-{os.environ['RANK']}"), "w") as f:
    f.write(str(os.getpid()))

real_step, steps = train.train_step, [0]


def failing_step(*args, **kwargs):
    steps[0] += 1
    if data.distributed()[0] == 1 and steps[0] == 2:  # rank 1, mid-training
        with open(os.path.join(FOLDER, "failed-at"), "w") as f:
            f.write(repr(time.time()))
        if HOW == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise data.RunError("rank 1 stops at its second step (test)")
    return real_step(*args, **kwargs)


if HOW != "none":
    train.train_step = failing_step
data.run_command({"train": train.main, "dafusion": dafusion.main}[SCRIPT], sys.argv[3:])
