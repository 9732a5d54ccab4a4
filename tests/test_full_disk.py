"""A full disk on a real file system (a small tmpfs, filled with a ballast file): whatever library
was writing (torch's zip writer, PIL, matplotlib, safetensors, plain Python), the write ends as
data.DiskFull -- one line, no temporary, the previous file intact -- and once space is freed,
--resume (or the same command) finishes. An ordinary bug on a disk with room keeps its own
error. Needs root (mount); skipped, with the reason, where a tmpfs cannot be mounted."""

import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import dafusion
import data
import train
from helpers import assert_same_weights
from test_inputs import TINY, assert_one_line, command
from test_nothing_lost import DAFUSION, temporaries


@pytest.fixture
def disk(tmp_path):
    """An 8 MiB tmpfs mounted at tmp_path/disk for this test, unmounted after it."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the full-disk tests on a real file system "
                    "did not run")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield folder
    finally:  # busy: a file there is still open (a leak), which the test should have caught
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
            pytest.fail(f"{folder}: still in use after the test (a file left open there)")


def open_files(folder):
    """The files under `folder` that this process holds open (deleted ones included)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return [name for name in held if name.startswith(str(folder) + os.sep)]


def fill(disk, leave=0):
    """Take the disk's free space but `leave` bytes with disk/ballast (unbuffered writes, so that
    every byte that fits is on the disk); returns the ballast's path, to delete later."""
    ballast = disk / "ballast"
    todo = shutil.disk_usage(disk).free - leave
    with open(ballast, "ab", buffering=0) as f:
        while todo > 0:
            try:
                todo -= f.write(b"\0" * min(todo, 1 << 20))
            except OSError as error:  # the last page: the disk is full
                assert error.errno == errno.ENOSPC
                break
    assert shutil.disk_usage(disk).free <= leave + 4096, shutil.disk_usage(disk)
    return ballast


def fill_before_call(monkeypatch, module, name, disk, n, wanted=lambda *a: True):
    """module.name fills the disk just before its n-th call for which wanted(*args) holds (the
    disk fills between two writes of the run)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        if wanted(*args):
            calls["n"] += 1
            if calls["n"] == n:
                fill(disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return real


def decodes(path):
    with Image.open(path) as image:
        image.load()  # every pixel read: a cut file fails here
    return True


# -----------------------------------------------------------------------------
# atomic_write: any writer, a real full disk


def torch_by_name(tmp):  # torch's C++ writer: its error carries no errno
    torch.save({"w": torch.zeros(300_000)}, tmp)


def torch_through_python(tmp):  # data.save_torch's way: ENOSPC is the error's context
    with open(tmp, "wb") as f:
        torch.save({"w": torch.zeros(300_000)}, f)


def pil_png(tmp):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)).save(tmp)


def matplotlib_png(tmp):
    plt = data.pyplot()
    fig = plt.figure()
    plt.plot(range(10))
    fig.savefig(tmp)
    plt.close(fig)


def safetensors_file(tmp):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(300_000)}, tmp)


def python_text(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("x" * 1_000_000)


WRITERS = [torch_by_name, torch_through_python, pil_png, matplotlib_png, safetensors_file,
           python_text]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_any_writer_on_a_full_disk_raises_disk_full_and_keeps_the_old_file(writer, disk):
    ext = {pil_png: ".png", matplotlib_png: ".png", safetensors_file: ".safetensors",
           python_text: ".txt"}.get(writer, ".pt")
    path = str(disk / "out" / f"file{ext}")
    data.write_text(path, "the previous version")  # what --resume would read
    fill(disk)
    with pytest.raises(data.DiskFull) as caught:
        data.atomic_write(path, writer)
    assert f"could not write {path}" in str(caught.value) and "\n" not in str(caught.value)
    assert os.listdir(disk / "out") == [os.path.basename(path)]  # no temporary
    assert open_files(disk) == []  # nor one removed but held open, keeping its space
    with open(path, encoding="utf-8") as f:
        assert f.read() == "the previous version"


def test_an_ordinary_error_on_a_disk_with_room_is_not_a_full_disk(disk):
    def buggy(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 100_000)
        raise RuntimeError("unexpected pos 12 vs 10")  # torch's words, with the disk not full

    with pytest.raises(RuntimeError, match="unexpected pos") as caught:
        data.atomic_write(str(disk / "model.pt"), buggy)
    assert not isinstance(caught.value, data.DiskFull)
    assert os.listdir(disk) == []  # its temporary is gone all the same


def test_a_file_larger_than_the_room_left_is_a_full_disk(disk):
    # 3 MB free, 6 MB to write: whatever the writer's error, the file cannot be finished there
    fill(disk, leave=3_000_000)

    def stopped(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 1_000_000)
        raise RuntimeError("the writer's own words")

    with pytest.raises(data.DiskFull, match="it needs about 6.0 MB"):
        data.atomic_write(str(disk / "big.bin"), stopped, size=6_000_000)
    assert os.listdir(disk) == ["ballast"]


# -----------------------------------------------------------------------------
# train.py: a checkpoint, a later checkpoint, the report's pictures


def test_a_first_checkpoint_that_does_not_fit_stops_in_one_line_and_resume_finishes(disk,
                                                                                     capsys):
    ballast = fill(disk, leave=300_000)  # config.json and metrics.jsonl fit, a checkpoint not
    code, err = command("train", TINY + ["--out", str(disk), "--name", "r"], capsys)
    run = disk / "r"
    assert_one_line(code, err, "the disk is full", f"could not write {run / 'checkpoint.pt'}",
                    f"continue with: python train.py --resume {run}")
    assert code == 1
    assert not temporaries(run) and not (run / "checkpoint.pt").exists()
    with open(run / "config.json", encoding="utf-8") as f:
        assert json.load(f)["epochs"] == 2  # the settings --resume reads are whole
    os.remove(ballast)  # space freed
    train.main(["--resume", str(run)])
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert "test_accuracy" in json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert not temporaries(run)


def test_a_disk_that_fills_between_checkpoints_keeps_the_previous_one(disk, tmp_path,
                                                                      monkeypatch, capsys):
    argv = TINY + ["--out", str(disk), "--name", "r"]
    train.main(TINY + ["--out", str(tmp_path), "--name", "straight"])  # never stopped
    real = fill_before_call(monkeypatch, data, "save_torch", disk, 2,  # epoch 2's checkpoint
                            lambda path, *_: path.endswith("checkpoint.pt"))
    code, err = command("train", argv, capsys)
    run = disk / "r"
    assert_one_line(code, err, "the disk is full", "checkpoint.pt", "--resume")
    assert not temporaries(run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # intact, and epoch 1's
    assert state["epoch"] == 1 and state["step"] == 0
    monkeypatch.setattr(data, "save_torch", real)
    os.remove(disk / "ballast")
    train.main(["--resume", str(run)])
    assert_same_weights(tmp_path / "straight", run)  # as if never stopped


def test_a_disk_that_fills_during_the_report_pictures_resumes_to_the_report(disk, monkeypatch,
                                                                           capsys):
    argv = TINY[:-1] + ["--out", str(disk), "--name", "r"]  # with the report's pictures
    real = fill_before_call(monkeypatch, data, "save_figure", disk, 2)  # the second picture
    code, err = command("train", argv, capsys)
    run = disk / "r"
    assert_one_line(code, err, "the disk is full", ".png", "--resume")
    assert not temporaries(run)
    pictures = sorted(run.glob("*.png"))
    assert len(pictures) == 1 and decodes(pictures[0])  # the first one, whole; no half second
    assert not (run / "report.md").exists() and not (run / "metrics.json").exists()
    monkeypatch.setattr(data, "save_figure", real)
    os.remove(disk / "ballast")
    train.main(["--resume", str(run)])
    report = (run / "report.md").read_text(encoding="utf-8")
    shown = [line.split("](")[1].rstrip(")") for line in report.splitlines() if "](" in line]
    assert len(shown) >= 3 and all(decodes(run / name) for name in shown)
    assert (run / "metrics.json").exists() and not temporaries(run)


# -----------------------------------------------------------------------------
# dafusion.py: the disk fills while images are generated


def test_a_disk_that_fills_while_generating_keeps_what_is_listed(disk, monkeypatch, capsys):
    out = str(disk / "syn")
    argv = DAFUSION + ["--out", out, "--per-image", "1"]
    real = fill_before_call(monkeypatch, data, "atomic_write", disk, 10,  # the 10th image
                            lambda path, *_: path.endswith(".png") and "contact" not in path)
    code, err = command("dafusion", argv, capsys)
    assert_one_line(code, err, "the disk is full", "could not write", "run the same command again")
    assert not temporaries(out)
    kept = data.manifest_rows(out)  # the first batch's 8; the manifest has no room for more
    assert len(kept) == 8 and all(dafusion.is_valid_image(os.path.join(out, r["path"]))
                                  for _, r in kept)
    monkeypatch.setattr(data, "atomic_write", real)
    os.remove(disk / "ballast")
    dafusion.main(argv)
    rows = data.manifest_rows(out)
    assert len(rows) == 32 and all(dafusion.is_valid_image(os.path.join(out, r["path"]))
                                   for _, r in rows)
