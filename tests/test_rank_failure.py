"""Under torchrun, a failure on any rank ends every rank within seconds, with its message printed
once: real `torchrun --nproc_per_node=2` runs on the CPU (gloo), each rank a real process.
(a) rank 0 fails before training -- its run-folder claim (--out is a file), or the DDPM it
    would train (dafusion.py: another run's DDPM in the folder) while rank 1 waits at a barrier;
(b) rank 1 raises mid-training while rank 0 waits in a collective;
(c) rank 1 is killed (SIGKILL) mid-training: it prints nothing, torchrun names it.
A hang fails the test at LIMIT seconds (and its processes are killed) instead of hanging CI;
every bound here is far below a collective's own timeout (30 minutes)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WORKER = os.path.join(ROOT, "tests", "rank_failure_worker.py")
TINY = ["--examples-per-class", "12", "--epochs", "2", "--batch-size", "48", "--linear-epochs",
        "3", "--device", "cpu", "--no-report"]  # 2 steps an epoch: rank 1 fails in the second
LIMIT = 120  # seconds: a run still going then is hung
ENDED_WITHIN = 20  # seconds from the failure to the end of every process (torchrun included)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid):
    """True while process `pid` exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc: trust kill(pid, 0)
        return True


def torchrun(tmp_path, how, script, argv):
    """Run rank_failure_worker.py under torchrun with 2 ranks; returns (exit status, stderr,
    the time it ended, the ranks' process ids). Every rank still running at the end (hung, or
    left behind by torchrun) is killed, and the test fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "RANK_FAILURE_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), WORKER, how, script, *argv]
    # its own session: on a hang, the whole torchrun process group can be killed
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=LIMIT)
        ended = time.time()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        err, ended = process.communicate()[1], None
    pids = [int((tmp_path / f"pid-{rank}").read_text()) for rank in (0, 1)
            if (tmp_path / f"pid-{rank}").exists()]
    left = [pid for pid in pids if running(pid)]  # torchrun starts each rank in its own session
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert ended is not None, f"hung: still running after {LIMIT} s\n{err[-3000:]}"
    assert len(pids) == 2 and not left, (pids, left, err[-3000:])  # every rank has ended
    return process.returncode, err, ended, pids


def test_rank0_claim_error_is_said_once_and_ends_every_rank(tmp_path):
    # a real error only rank 0 meets: --out is a file, so its run-folder claim fails; rank 1
    # waits for the folder's name in a broadcast
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    status, err, ended, _ = torchrun(tmp_path, "none", "train",
                                     TINY + ["--out", str(not_a_folder), "--name", "r"])
    # the failure comes after both ranks have started (their pid files)
    started = max((tmp_path / f"pid-{rank}").stat().st_mtime for rank in (0, 1))
    assert status != 0
    assert ended - started < ENDED_WITHIN, ended - started
    message = f"error: --out {not_a_folder}: cannot create it"
    assert err.count(message) == 1, err[-3000:]  # once, from rank 0: not again from rank 1
    assert "[rank1]" not in err, err[-3000:]


def test_rank0_ddpm_error_is_said_once_while_rank1_waits(tmp_path):
    # dafusion.py: rank 0 alone trains the DDPM while rank 1 waits at a barrier. The folder
    # holds a DDPM of other settings, which rank 0 refuses (a real error) before training.
    out = tmp_path / "syn"
    (out / "ddpm").mkdir(parents=True)
    (out / "ddpm" / "meta.json").write_text('{"classes": 99}')
    status, err, ended, _ = torchrun(tmp_path, "none", "dafusion", [
        "--out", str(out), "--examples-per-class", "3", "--per-image", "2", "--ddpm-steps", "5",
        "--gen-batch-size", "4", "--gen-device", "cpu"])
    # rank 0 writes generation.json just before the barrier, then fails at the DDPM
    assert status != 0
    assert ended - (out / "generation.json").stat().st_mtime < ENDED_WITHIN
    message = f"error: {out / 'ddpm'} holds a DDPM trained with other settings"
    assert err.count(message) == 1, err[-3000:]
    # rank 1's broken barrier is a consequence: no word from it, no traceback
    assert "[rank1]" not in err and "Connection closed" not in err, err[-3000:]


def rank1_stopped_mid_training(tmp_path, how):
    """A training run whose rank 1 stops at its second step (`how`: raise, kill): every process
    has ended with a non-zero status within ENDED_WITHIN of it. Returns torchrun's stderr."""
    status, err, ended, _ = torchrun(tmp_path, how, "train",
                                     TINY + ["--out", str(tmp_path), "--name", "r"])
    failed_at = float((tmp_path / "failed-at").read_text())
    assert status != 0
    assert ended - failed_at < ENDED_WITHIN, ended - failed_at
    return err


def test_rank1_error_mid_training_is_said_once_and_ends_rank0(tmp_path):
    err = rank1_stopped_mid_training(tmp_path, "raise")
    # once, from rank 1, with its rank; rank 0's broken collective adds nothing
    assert err.count("[rank1]: error: rank 1 stops at its second step (test)") == 1, err[-3000:]
    assert err.count("rank 1 stops at its second step") == 1, err[-3000:]
    assert "Connection closed" not in err, err[-3000:]


def test_rank1_killed_mid_training_ends_rank0_within_seconds(tmp_path):
    err = rank1_stopped_mid_training(tmp_path, "kill")
    # the killed rank says nothing; torchrun's summary names it and its signal
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", err), err[-3000:]
