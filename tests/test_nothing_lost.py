"""Nothing a run made is lost or half-written when runs share a machine, a folder or a full disk:
run folders claimed atomically, shared output folders locked, any file name the file system
allows, outputs checked before any work, and a full disk (real ENOSPC, from /dev/full) stopping
a run with one line and no temporary, the last checkpoint intact, --resume going on."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dafusion
import data
import supcon
import train
from helpers import assert_same_weights
from test_inputs import TINY, assert_one_line, command

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}


def start(script, argv, cwd):
    """A real `python <script>.py argv` process, started now (not waited for)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv], cwd=cwd,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="surrogateescape")  # names as their bytes


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# -----------------------------------------------------------------------------
# Run folders


def test_runs_started_together_each_get_their_own_folder(tmp_path):
    # the usual shell loop over seeds: `for s in 1 2 3; do python train.py --seed $s & done`
    runs = [start("train", TINY + ["--seed", str(seed), "--out", str(tmp_path / "runs")], tmp_path)
            for seed in (1, 2, 3)]
    folders = {}
    for seed, process in zip((1, 2, 3), runs):
        code, out, err = finish(process)
        assert code == 0, err[-2000:]
        folders[seed] = re.search(r"results in (\S+)", out).group(1)  # the folder it printed
    assert len(set(folders.values())) == 3 and len(os.listdir(tmp_path / "runs")) == 3
    for seed, folder in folders.items():  # the printed folder is the one this run wrote
        import json
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            assert json.load(f)["seed"] == seed
        assert os.path.exists(os.path.join(folder, "model.pt"))


def test_the_default_name_of_a_second_run_in_the_same_second_takes_the_next_number(tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(train.time, "strftime", lambda fmt: "20261206-120000")  # one second
    args = train.build_parser().parse_args(["--out", str(tmp_path)])
    first, second = train.claim_run_folder(args), train.claim_run_folder(args)
    assert os.path.basename(first) == "supcon-digits-20261206-120000"
    assert os.path.basename(second) == "supcon-digits-20261206-120000-2"


def test_the_same_name_started_twice_at_once_is_one_run_and_one_refusal(tmp_path):
    argv = TINY + ["--out", str(tmp_path), "--name", "shared"]
    results = [finish(p) for p in [start("train", argv, tmp_path) for _ in range(2)]]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    code, _, err = next(r for r in results if r[0] == 1)
    assert_one_line(code, err, "shared already exists", "--name")
    assert os.path.exists(tmp_path / "shared" / "model.pt")


def test_a_second_resume_of_a_running_run_is_refused(tmp_path, monkeypatch, capsys):
    train.main(TINY + ["--out", str(tmp_path), "--name", "r"])
    run = str(tmp_path / "r")
    with data.folder_lock(run):  # another process holds the run (here: this test)
        child = start("train", ["--resume", run, "--epochs", "3"], tmp_path)
        code, _, err = finish(child)
    assert_one_line(code, err, "another process is running this run")


# -----------------------------------------------------------------------------
# One synthetic folder, two processes


DAFUSION = ["--examples-per-class", "2", "--ddpm-steps", "5", "--gen-batch-size", "8"]


def read_lines(process, lines, seen, needle):
    """A thread's work: collect the process's stdout lines; set `seen` once one holds needle."""
    for line in process.stdout:
        lines.append(line)
        if needle in line:
            seen.set()


def test_two_processes_filling_one_out_wait_for_each_other(tmp_path):
    import threading
    out = str(tmp_path / "syn")
    os.makedirs(out)
    with data.folder_lock(out):  # held here until both processes wait for it: they must meet
        runs = [start("dafusion", DAFUSION + ["--out", out], tmp_path) for _ in range(2)]
        lines, seen = [[], []], [threading.Event(), threading.Event()]
        readers = [threading.Thread(target=read_lines, args=(p, lines[i], seen[i], "waiting"))
                   for i, p in enumerate(runs)]
        for reader in readers:
            reader.start()
        assert all(event.wait(300) for event in seen), lines  # both wait, neither writes
        assert data.manifest_rows(out) == []
    for process, reader in zip(runs, readers):  # the lock is free: one makes, one reuses
        process.wait(600)
        reader.join()
        assert process.returncode == 0, process.stderr.read()[-2000:]
    said = "".join(lines[0] + lines[1])
    assert said.count("waiting until it is done") >= 2 and "already in" in said
    rows = data.manifest_rows(out)
    assert len(rows) == 8 * 2 * 2 * 4  # 8 classes x 2 images x 2 kinds x 4 variations
    assert all(dafusion.is_valid_image(os.path.join(out, r["path"])) for _, r in rows)


def test_two_processes_with_other_settings_never_mix_their_sets(tmp_path):
    out = str(tmp_path / "syn")
    runs = [start("dafusion", DAFUSION + ["--out", out, "--ood-strength", s], tmp_path)
            for s in ("0.5", "0.7")]
    results = [finish(p) for p in runs]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    won = "0.5" if results[0][0] == 0 else "0.7"  # the strength of the process that made the set
    code, _, err = next(r for r in results if r[0] == 1)
    assert_one_line(code, err, "--out", out, "another set")
    rows = data.manifest_rows(out)
    assert len(rows) == 8 * 2 * 2 * 4 and all(
        dafusion.is_valid_image(os.path.join(out, r["path"])) for _, r in rows)
    assert {r["strength"] for _, r in rows if r["kind"] == "near_ood"} == {won}
    on_disk = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".png")
               and "contact_sheet" not in f]
    assert len(on_disk) == len(rows)  # not one image of the refused set


# -----------------------------------------------------------------------------
# Any file name the file system allows


def test_names_that_are_not_utf8_are_read_generated_from_listed_and_trained_on(tmp_path):
    root = os.fsencode(str(tmp_path / "parts"))
    rng = np.random.default_rng(0)
    names = {b"caf\xe9": [b"\xff\xfe-1.png", b"plain.png", b"tab\tand,comma.png"],  # Latin-1
             b"bolt": [b"b1.png", b"\x80\x81.png", b" lead.png"]}
    for cls, files in names.items():
        os.makedirs(os.path.join(root, cls))
        for name in files:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                os.fsdecode(os.path.join(root, cls, name)), format="PNG")
    negatives = os.path.join(os.fsencode(str(tmp_path)), b"neg\xfe")
    os.makedirs(negatives)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        os.fsdecode(os.path.join(negatives, b"\xe9t\xe9.png")), format="PNG")
    folder, syn = os.fsdecode(root), str(tmp_path / "syn")
    common = ["--data", folder, "--image-size", "16", "--ood-classes", "", "--val-fraction", "0.34"]
    code, out, err = finish(start("dafusion", common + ["--out", syn, "--per-image", "1",
                                                        "--ddpm-steps", "5"], tmp_path))
    assert code == 0, err[-2000:]
    rows = data.manifest_rows(syn)
    sources = {r["source"] for _, r in rows}
    splits = data.load_data(folder, image_size=16, ood_classes="", val_fraction=0.34)
    assert sources == {splits.source_id(n) for n in splits.train.names}  # every training image
    assert any(os.fsencode(s) != s.encode("utf-8", "replace") for s in sources)  # some not UTF-8
    assert {r["label"] for _, r in rows} <= {"bolt", os.fsdecode(b"caf\xe9")}
    code, out, err = finish(start("train", common + [
        "--synthetic", syn, "--positives", "id", "--negatives", "near_ood", "--negative-data",
        os.fsdecode(negatives), "--epochs", "1", "--batch-size", "4", "--linear-epochs", "1",
        "--out", str(tmp_path / "runs")], tmp_path))
    assert code == 0, err[-2000:]
    assert "1 real negatives" in out and "results in" in out


# -----------------------------------------------------------------------------
# Outputs checked before any work


@pytest.mark.parametrize("script", ["train", "dafusion"])
def test_an_output_that_cannot_be_made_is_refused_before_the_data_loads(script, tmp_path,
                                                                        monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    loaded = []
    monkeypatch.setattr(data, "splits_from_args", lambda args: loaded.append(1) or 1 / 0)
    code, err = command(script, ["--out", str(tmp_path / "file" / "out")], capsys)
    assert_one_line(code, err, "--out", "file/out", "choose another --out")
    assert not loaded  # refused before any data was read


# -----------------------------------------------------------------------------
# A full disk: writes fail with the kernel's own ENOSPC (a temporary linked to /dev/full)


def full_disk_at(monkeypatch, wanted, n=1):
    """The n-th atomic write of a path for which wanted(path) is true finds the disk full: its
    temporary is a link to /dev/full, where every write fails with ENOSPC."""
    real, calls = data.atomic_write, {"n": 0}

    def write(path, writer, size=None):
        if wanted(path):
            calls["n"] += 1
            if calls["n"] == n:
                stem, ext = os.path.splitext(path)
                os.symlink("/dev/full", f"{stem}.tmp{os.getpid()}{ext}")
        return real(path, writer, size)

    monkeypatch.setattr(data, "atomic_write", write)
    return real


def temporaries(folder):
    return [f for _, _, fs in os.walk(folder) for f in fs if ".tmp" in f]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("n", [1, 2])  # the first checkpoint, and a later one
def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_resume_goes_on(n, tmp_path,
                                                                          monkeypatch, capsys):
    argv = TINY + ["--epochs", "3", "--out", str(tmp_path)]
    train.main(argv + ["--name", "straight"])
    real = full_disk_at(monkeypatch, lambda p: p.endswith("checkpoint.pt"), n)
    code, err = command("train", argv + ["--name", "cut"], capsys)
    assert_one_line(code, err, "the disk is full", "checkpoint.pt", "it needs about",
                    f"continue with: python train.py --resume {tmp_path / 'cut'}")
    run = tmp_path / "cut"
    assert not temporaries(run)  # no half-written checkpoint.tmp*.pt left
    if n == 1:
        assert not (run / "checkpoint.pt").exists()
    else:  # the last good checkpoint is intact: epoch 1's
        assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(data, "atomic_write", real)  # space freed
    train.main(["--resume", str(run), "--device", "cpu"])
    assert_same_weights(tmp_path / "straight", run)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_at_a_report_picture_resumes_to_the_report(tmp_path, monkeypatch, capsys):
    argv = TINY[:-1] + ["--out", str(tmp_path), "--name", "r"]  # with the report's pictures
    real = full_disk_at(monkeypatch, lambda p: p.endswith("tsne.png"))
    code, err = command("train", argv, capsys)
    assert_one_line(code, err, "the disk is full", "tsne.png", "--resume")
    assert not temporaries(tmp_path / "r") and not (tmp_path / "r" / "metrics.json").exists()
    monkeypatch.setattr(data, "atomic_write", real)
    train.main(["--resume", str(tmp_path / "r")])
    assert (tmp_path / "r" / "tsne.png").exists() and (tmp_path / "r" / "metrics.json").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_while_generating_keeps_the_finished_images(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "syn")
    argv = DAFUSION + ["--out", out, "--per-image", "1"]
    real = full_disk_at(monkeypatch, lambda p: p.endswith(".png") and "contact" not in p, 10)
    code, err = command("dafusion", argv, capsys)
    assert_one_line(code, err, "the disk is full", ".png", "run the same command again")
    assert not temporaries(out)
    kept = data.manifest_rows(out)
    assert len(kept) == 9  # the nine images before the failed 10th are kept and listed
    monkeypatch.setattr(data, "atomic_write", real)
    dafusion.main(argv)
    assert len(data.manifest_rows(out)) == 32


def test_a_full_disk_while_saving_a_folder_removes_it_and_says_so(tmp_path):
    # the DDPM is saved as a folder by diffusers (safetensors reports ENOSPC in words); the
    # kernel's error is raised inside the writer here
    def writer(tmp):
        os.makedirs(tmp)
        with open(os.path.join(tmp, "weights.bin"), "wb") as f:
            f.write(b"x" * 5000)
        raise RuntimeError("No space left on device (os error 28)")

    with pytest.raises(data.DiskFull) as caught:
        data.atomic_write(str(tmp_path / "ddpm"), writer, size=2_000_000)
    assert "could not write" in str(caught.value) and "2.0 MB" in str(caught.value)
    assert os.listdir(tmp_path) == []  # the half-written folder is gone


# -----------------------------------------------------------------------------
# The three smaller ones


def test_a_dataset_scope_batch_without_a_triplet_moves_no_weight(tmp_path, monkeypatch):
    no_triplet = lambda *a, **k: (torch.zeros(0, dtype=torch.long),) * 3  # noqa: E731
    monkeypatch.setattr(supcon, "mine_triplets", no_triplet)
    argv = TINY + ["--loss", "triplet", "--mining-scope", "dataset", "--out", str(tmp_path),
                   "--name", "t"]
    train.main(argv)
    torch.manual_seed(0)  # the run's initial weights (--seed 0)
    model, _ = supcon.build_model("cnn", "triplet", 1, 16, 8)
    saved = torch.load(tmp_path / "t" / "model.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():  # AdamW's decay would have moved every one
        assert torch.equal(saved[key], value), key


def test_resnet_blames_pretrained_only_when_it_was_asked_for(monkeypatch):
    import torchvision

    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(torchvision.models, "get_model", broken)
    with pytest.raises(RuntimeError) as plain:
        supcon.resnet("resnet18")
    assert "--pretrained" not in str(plain.value)
    with pytest.raises(RuntimeError, match="--pretrained"):
        supcon.resnet("resnet18", pretrained=True)
