"""What a user brings is read as they see it, or refused with one line: every numeric flag of the
three scripts, images as a viewer shows them, synthetic sets that would leak the test split,
class names that would share a folder, masks, checkpoints, resumed runs and their log."""

import argparse
import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dafusion
import data
import evaluate
import supcon
import train
from helpers import assert_same_weights, stop_at_call, stop_at_image
from test_data import write_folder, write_manifest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = ["--examples-per-class", "12", "--epochs", "2", "--batch-size", "48", "--linear-epochs",
        "3", "--device", "cpu", "--no-report"]
SCRIPTS = {"train": train, "dafusion": dafusion, "evaluate": evaluate}


def command(script, argv, capsys):
    """Run `python <script>.py argv` in this process as the command line does: (exit status,
    stderr). Only a refusal is expected here."""
    with pytest.raises(SystemExit) as stop:
        data.run_command(SCRIPTS[script].main, argv)
    return stop.value.code, capsys.readouterr().err


def assert_one_line(code, err, *needles):
    """A refusal: non-zero status, one line on stderr that holds every needle, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -----------------------------------------------------------------------------
# Every numeric flag, with a bad value: refused where argparse reads it (status 2, one line)

BAD_VALUES = {  # flag -> a bad value (each script's flags; shared ones appear once per script)
    "--image-size": "4", "--val-fraction": "1", "--examples-per-class": "0", "--seed": "-1",
    "--negatives-per-batch": "nan", "--m-per-class": "1", "--near-ood-strength": "0",
    "--id-strength": "0", "--ood-strength": "1.5", "--strengths": "0.3,abc", "--per-image": "0",
    "--guidance": "-1", "--steps": "0", "--gen-batch-size": "0", "--ddpm-steps": "0",
    "--ddpm-batch-size": "0", "--embedding-dim": "0", "--temperature": "0",
    "--base-temperature": "-1", "--negative-weight": "inf", "--chunk-size": "-1",
    "--margin": "-0.5", "--epochs": "0", "--train-steps": "0", "--batch-size": "1", "--lr": "nan",
    "--weight-decay": "-1", "--warmup-epochs": "-1", "--warmup-steps": "-1",
    "--linear-epochs": "0",
    "--outlier-exposure": "-1", "--eval-every": "-1", "--workers": "-1", "--num-vectors": "0",
    "--ti-steps": "0", "--ti-lr": "0", "--ti-batch": "0", "--resolution": "4", "--episodes": "0",
    "--reference-epochs": "0",
    "--head-weight": "-1", "--head-ce-weight": "nan", "--prototype-momentum": "1",
    "--prototype-weight": "-0.5",
}
EXTRA_BAD = [("train", "--seed", "99999999999999"), ("train", "--temperature", "-1"),
             ("train", "--batch-size", "0"),
             ("train", "--batch-size", "-5"), ("train", "--epochs", "-1"),
             ("train", "--examples-per-class", "-1"), ("train", "--lr", "abc"),
             ("dafusion", "--steps", "0"), ("dafusion", "--gen-batch-size", "0")]


def numeric_flags(script):
    """Every option of a script whose value is a number (checked by data's type functions)."""
    return sorted(a.option_strings[0] for a in SCRIPTS[script].build_parser()._actions
                  if getattr(a.type, "checked", False))


def test_no_numeric_flag_is_read_unchecked():
    # a plain int/float type would let --batch-size 0 or --lr nan through to the data load
    for script in SCRIPTS:
        for action in SCRIPTS[script].build_parser()._actions:
            assert action.type not in (int, float), (script, action.option_strings)
        assert set(numeric_flags(script)) <= set(BAD_VALUES), script


CASES = [(s, flag, BAD_VALUES[flag]) for s in SCRIPTS for flag in numeric_flags(s)] + EXTRA_BAD


@pytest.mark.parametrize("script,flag,value", CASES)
def test_a_bad_number_is_refused_in_one_line_before_any_work(script, flag, value, tmp_path,
                                                              capsys):
    argv = [flag, value, "--out", str(tmp_path / "out")] if script != "evaluate" else [flag, value]
    if script == "train":
        argv += ["--name", "r"]
    code, err = command(script, argv, capsys)
    assert code == 2
    assert_one_line(code, err, f"{script}.py: error: argument {flag}", value.split(",")[-1])
    assert not (tmp_path / "out").exists()  # no run folder, no output folder


# -----------------------------------------------------------------------------
# Values only the data can refuse: one line, status 1, no run folder


@pytest.fixture(scope="module")
def one_class_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    write_folder(root / "parts", classes=("bolt",), per_class=6)
    return str(root / "parts")


@pytest.mark.parametrize("argv,needles", [
    (["--examples-per-class", "500"], ["--examples-per-class 500", "use at most"]),
    (["--val-fraction", "0"], ["--val-fraction 0 leaves no test images"]),
    (["--ood-classes", "0,1,2,3,4,5,6,7,8"], ["--ood-classes", "leaves 1 training class"]),
    (["--device", "gpu"], ["--device gpu: not a device name"]),
    (["--device", "cuda:7"], ["--device cuda:7: no such CUDA GPU"]),
    (["--loss", "simclr", "--hard-negatives", "same_class"], ["--hard-negatives all"]),
    (["--epochs", "3", "--train-steps", "9"], ["--epochs and --train-steps"]),
    (["--synthetic", "nowhere", "--positives", "id"], ["--synthetic nowhere: no manifest.csv"]),
    (["--masks", "nowhere"], ["--masks nowhere: no such folder"]),
    (["--init-from", "nowhere"], ["--init-from nowhere: no model.pt"]),
    (["--loss", "triplet", "--temperature", "0.2"], ["--temperature has no effect with --loss "
                                                     "triplet"]),
    (["--negative-weight", "0", "--loss", "cosine"], ["--negative-weight has no effect"]),
    (["--margin", "0.3"], ["--margin has no effect with --loss supcon"]),
    (["--prototype-weight", "2"],  # no negatives: the plain mode, no word of their default
     ["--prototype-weight has no effect with --negative-mode denominators; it is for prototypes"]),
    (["--negatives", "near_ood", "--negative-mode", "denominators", "--negatives-per-batch",
      "0.01", "--batch-size", "16"], ["rounds to no negative per batch"]),
    (["--negatives", "near_ood", "--negative-weight", "2"],  # the default mode does not read it
     ["--negative-weight has no effect with --negative-mode score (the default with negatives",
      "--negative-mode denominators"]),
])
def test_data_dependent_values_are_refused_in_one_line(argv, needles, tmp_path, capsys):
    code, err = command("train", argv + ["--out", str(tmp_path), "--name", "r"], capsys)
    assert_one_line(code, err, *needles)
    assert not (tmp_path / "r").exists()


def test_a_one_class_folder_blames_the_folder_not_ood_classes(one_class_folder, tmp_path, capsys):
    code, err = command("train", ["--data", one_class_folder, "--out", str(tmp_path)], capsys)
    assert_one_line(code, err, "holds 1 class", "at least 2")
    assert "--ood-classes" not in err
    assert not os.listdir(tmp_path)


def test_dafusion_refusals_are_one_line(tmp_path, capsys):
    code, err = command("dafusion", ["--out", str(tmp_path / "s"), "--kinds", "both"], capsys)
    assert_one_line(code, err, "--kinds must name id and/or near_ood")
    for argv, needle in ((["--ti-steps", "5"], "--ti-steps has no effect with --generator ddpm"),
                         (["--strengths", "0.3", "--ood-strength", "0.6"], "drop --ood-strength"),
                         (["--generator", "stable-diffusion", "--model", "m", "--prompt", "a cat"],
                          "has no {}")):
        code, err = command("dafusion", ["--out", str(tmp_path / "s")] + argv, capsys)
        assert_one_line(code, err, needle)
    code, err = command("dafusion", ["--out", str(tmp_path / "s"), "--generator",
                                     "stable-diffusion", "--model", str(tmp_path),
                                     "--resolution", "12"], capsys)
    assert_one_line(code, err, "--resolution 12 must be a multiple of 8")


def test_ctrl_c_in_dafusion_says_what_was_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    argv = ["--out", str(tmp_path / "syn"), "--examples-per-class", "3", "--per-image", "1",
            "--ddpm-steps", "2", "--gen-batch-size", "4"]
    stop_at_image(monkeypatch, 5)
    code, err = command("dafusion", argv, capsys)
    assert code == 130
    assert_one_line(code, err, "Ctrl-C: kept the 4 finished images", "continue with: python "
                    "dafusion.py --out")


# -----------------------------------------------------------------------------
# Images as a viewer shows them


def test_16_bit_grey_keeps_its_grey_levels(tmp_path):
    levels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    got = data.open_image(str(tmp_path / "g16.png"), 1, 64)[0].numpy()
    np.testing.assert_array_equal(got, np.round(levels / 257.0).astype(np.uint8))
    assert len(np.unique(got)) == 256  # not the 0/255 silhouette convert("L") would make


def test_exif_rotation_and_transparency_are_applied(tmp_path):
    stored = np.zeros((10, 20, 3), dtype=np.uint8)
    stored[:, :10] = 255  # left half white as stored; the tag turns it into the top half
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    image.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    viewed = data.read_pil(str(tmp_path / "phone.jpg"))
    assert viewed.size == (10, 20)  # portrait, as a viewer shows it
    array = np.asarray(viewed)
    assert array[:8].mean() > 200 and array[-8:].mean() < 50
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # invisible black pixels: a viewer shows white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    assert data.open_image(str(tmp_path / "cutout.png"), 3, 8).min() == 255


def test_folders_skip_hidden_files_read_sub_folders_and_refuse_train_without_test(tmp_path,
                                                                                  capsys):
    write_folder(tmp_path / "d", per_class=4, size=12)
    (tmp_path / "d" / "ant" / "._000.png").write_bytes(b"macOS metadata, not an image")
    os.makedirs(tmp_path / "d" / "__MACOSX" / "ant")
    os.makedirs(tmp_path / "d" / "bee" / "batch2")
    Image.new("RGB", (12, 12), (1, 2, 3)).save(tmp_path / "d" / "bee" / "batch2" / "x.png")
    (tmp_path / "d" / "cat" / "notes.txt").write_text("not an image")
    s = data.load_data(str(tmp_path / "d"), image_size=8, val_fraction=0.25, ood_classes="")
    assert s.classes == ["ant", "bee", "cat"]
    assert len(s.train) + len(s.test) == 13  # 4 + 4 + 1 in a sub-folder + 4
    assert "left out 1 file(s)" in capsys.readouterr().out  # the .txt, said once
    os.makedirs(tmp_path / "e" / "train")
    os.makedirs(tmp_path / "e" / "val")
    with pytest.raises(data.DataError, match="has train/ but not the other"):
        data.load_data(str(tmp_path / "e"))


def test_manifest_and_ood_images_do_not_advise_skip_bad_images(tmp_path):
    folder = str(tmp_path / "syn")
    write_manifest(folder, [("id/1/a_0.png", "1", "id")])
    open(os.path.join(folder, "id/1/a_0.png"), "wb").write(b"broken")
    from test_data import splits_of
    with pytest.raises(data.DataError) as error:
        data.read_manifest(folder, splits_of(["0", "1"]), 8, 1)
    assert "a_0.png" in str(error.value) and "--skip-bad-images" not in str(error.value)
    assert "re-run dafusion.py" in str(error.value)
    os.makedirs(tmp_path / "ood")
    (tmp_path / "ood" / "x.png").write_bytes(b"broken")
    with pytest.raises(data.DataError) as error:
        evaluate.load_ood_folder(str(tmp_path / "ood"), 1, 8, "crop")
    assert "x.png" in str(error.value) and "--skip-bad-images" not in str(error.value)
    with pytest.raises(data.DataError, match="no such folder"):
        evaluate.load_ood_folder(str(tmp_path / "nowhere"), 1, 8, "crop")


def test_a_manifest_strength_that_is_not_a_number_names_its_line(tmp_path):
    from test_data import splits_of
    folder = str(tmp_path / "syn")
    write_manifest(folder, [("id/1/a_0.png", "1", "id")], strength="abc")
    with pytest.raises(data.DataError, match="line 2: strength 'abc' must be a number"):
        data.read_manifest(folder, splits_of(["0", "1"]), 8, 1)


# -----------------------------------------------------------------------------
# Synthetic sets that would leak the test split


def test_a_set_made_for_another_split_is_refused_or_dropped_with_a_count(tmp_path, capsys):
    splits = data.load_data("digits", examples_per_class=5, seed=0)
    other = data.load_data("digits", examples_per_class=5, seed=1)  # another split of digits
    rows = [(f"id/x/{i}.png", splits.classes[int(lab)], "id", name)
            for i, (name, lab) in enumerate(zip(other.train.names, other.train.labels))]
    rows += [("id/x/test.png", splits.classes[int(splits.test.labels[0])], "id",
              splits.test.names[0])]
    folder = str(tmp_path / "syn")
    write_manifest(folder, rows)
    test_ids, ood_ids = set(splits.test.names), set(splits.ood_test.names)
    from_test = sum(r[3] in test_ids for r in rows)
    kept = sum(r[3] in set(splits.train.names) for r in rows)
    assert from_test >= 1
    with pytest.raises(data.DataError) as error:
        data.read_manifest(folder, splits, 16, 1)
    message = str(error.value)
    assert f"{len(rows) - kept} of {len(rows)} rows" in message
    assert f"{from_test} from this run's test images" in message
    assert "--drop-leaking-synthetic" in message
    synthetic = data.read_manifest(folder, splits, 16, 1, drop_leaking=True)
    assert len(synthetic) == kept
    assert f"left out {len(rows) - kept} of {len(rows)} rows" in capsys.readouterr().out
    assert not {r[3] for r in rows if r[3] in test_ids | ood_ids} & set(synthetic.names)


def test_train_refuses_a_synthetic_set_of_another_seed(tmp_path):
    folder = str(tmp_path / "syn")
    dafusion.main(["--out", folder, "--examples-per-class", "5", "--per-image", "1",
                   "--ddpm-steps", "2", "--seed", "1", "--kinds", "id"])
    argv = ["--synthetic", folder, "--positives", "id", "--examples-per-class", "5", "--seed",
            "0", "--epochs", "1", "--linear-epochs", "1", "--device", "cpu", "--no-report",
            "--out", str(tmp_path)]
    with pytest.raises(data.DataError, match="rows vary images this run does not train on"):
        train.main(argv + ["--name", "leak"])
    assert not (tmp_path / "leak").exists()
    result = train.main(argv + ["--name", "dropped", "--drop-leaking-synthetic"])
    assert 0 <= result["test_accuracy"] <= 1


# -----------------------------------------------------------------------------
# Class names: one folder (and one Stable Diffusion token) per class


NAMES = ["zero one", "zero-one", "零", "一", "Bolt", "bolt"]


def test_class_folders_are_one_to_one():
    folders = dafusion.class_folders(NAMES)
    assert len({f.lower() for f in folders.values()}) == len(NAMES)  # even on a macOS disk
    assert folders["zero-one"] == "zero-one"  # a plain name stays itself
    for name, folder in folders.items():
        assert all(ch.isascii() for ch in folder) and "/" not in folder, (name, folder)


def test_non_ascii_and_clashing_class_names_keep_every_image(tmp_path):
    root = tmp_path / "parts"
    write_folder(root, classes=NAMES[:4], per_class=3, size=12)
    out = str(tmp_path / "syn")
    argv = ["--data", str(root), "--image-size", "8", "--ood-classes", "", "--val-fraction", "0",
            "--out", out, "--per-image", "2", "--ddpm-steps", "2"]
    dafusion.main(argv)
    with open(os.path.join(out, "manifest.csv"), encoding="utf-8") as f:
        rows = list(__import__("csv").DictReader(f))
    files = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
             if f.endswith(".png") and "contact" not in f}
    assert len(rows) == 4 * 3 * 2 * 2 == len(files)  # classes x images x kinds x variations
    assert {r["path"] for r in rows} == {p.replace(os.sep, "/") for p in files}
    splits = data.load_data(str(root), image_size=8, ood_classes="", val_fraction=0)
    synthetic = data.read_manifest(out, splits, 8, 3)
    assert sorted(synthetic.labels.tolist()) == sorted([c for c in range(4)] * 12)


# -----------------------------------------------------------------------------
# Checkpoints that cannot be loaded safely, and resumed runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train.main(TINY + ["--out", str(out), "--name", "done"])
    return out / "done"


def write_bad_model_files(folder, run):
    """{kind: path} of a truncated file, a pickled object, and run's model.pt holding the
    weights of another model (a wider embedding)."""
    os.makedirs(folder, exist_ok=True)
    state = torch.load(run / "model.pt", weights_only=True)
    state["model"] = supcon.build_model("cnn", "supcon", 1, 16, 8, embedding_dim=32)[0].state_dict()
    torch.save(state, folder / "other.pt")
    (folder / "truncated.pt").write_bytes((run / "model.pt").read_bytes()[:200])
    torch.save({"model": argparse.Namespace(a=1)}, folder / "pickled.pt")  # a Python object
    return {"truncated": folder / "truncated.pt", "pickled": folder / "pickled.pt",
            "other": folder / "other.pt"}


@pytest.mark.parametrize("kind,needle", [("truncated", "not a complete PyTorch file"),
                                         ("pickled", "refused for safety"),
                                         ("other", "do not fit this model")])
def test_bad_checkpoints_are_refused_in_one_line(kind, needle, finished_run, tmp_path, capsys):
    bad = write_bad_model_files(tmp_path / "bad", finished_run)[kind]
    # --init-from RUN reads RUN/model.pt
    os.makedirs(tmp_path / "init")
    (tmp_path / "init" / "model.pt").write_bytes(bad.read_bytes())
    code, err = command("train", TINY + ["--init-from", str(tmp_path / "init"), "--out",
                                         str(tmp_path), "--name", "r"], capsys)
    assert_one_line(code, err, "--init-from", needle)
    # evaluate.py RUN and --resume RUN read the run's model.pt / checkpoint.pt
    run = tmp_path / "copy"
    os.makedirs(run)
    for name in ("config.json", "model.pt", "checkpoint.pt"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    (run / "model.pt").write_bytes(bad.read_bytes())
    code, err = command("evaluate", [str(run), "--no-pictures"], capsys)
    assert_one_line(code, err, "model file", needle)
    (run / "checkpoint.pt").write_bytes(bad.read_bytes())
    os.remove(run / "model.pt")
    code, err = command("train", ["--resume", str(run), "--device", "cpu"], capsys)
    assert_one_line(code, err, "--resume checkpoint", needle)
    assert "weights_only" not in err  # never advise loading a pickle


def test_resume_refuses_what_it_cannot_continue_and_extends_epochs(finished_run, tmp_path,
                                                                   capsys):
    run = tmp_path / "run"
    os.makedirs(run)
    for name in os.listdir(finished_run):
        (run / name).write_bytes((finished_run / name).read_bytes()) \
            if (finished_run / name).is_file() else None
    code, err = command("train", ["--resume", str(run), "--device", "cpu"], capsys)
    assert_one_line(code, err, "is finished (", "--epochs")
    code, err = command("train", ["--resume", str(run), "--lr", "0.5"], capsys)
    assert_one_line(code, err, "--lr cannot change")
    code, err = command("train", ["--resume", str(run), "--epochs", "1"], capsys)
    assert_one_line(code, err, "cannot be shortened")
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    result = train.main(["--resume", str(run), "--epochs", "4", "--device", "cpu"])
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in after] == [1, 2, 3, 4] and after[:2] == before
    assert result["optimizer_steps"] == 2 * after[1]["optimizer_steps"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 4
    # config.json but no checkpoint (a run stopped, or out of disk, before its first one):
    # --resume starts it from its first step: the weights of a new run of 4 epochs
    os.remove(run / "checkpoint.pt")
    train.main(["--resume", str(run), "--device", "cpu"])
    assert "stopped before its first checkpoint" in capsys.readouterr().out
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4]
    train.main(TINY + ["--epochs", "4", "--out", str(tmp_path), "--name", "new"])
    assert_same_weights(tmp_path / "new", run)


def test_the_log_of_a_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    args = TINY + ["--epochs", "3", "--batch-size", "16", "--out", str(tmp_path)]
    train.main(args + ["--name", "straight"])
    # a stop in the middle of epoch 2 (Ctrl-C), then a kill between epoch 3's metrics line and
    # its checkpoint (the process dies: no handler runs)
    real_loss = stop_at_call(monkeypatch, train, "forward", 9)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--name", "cut"])
    monkeypatch.setattr(train, "forward", real_loss)
    real_write = data.atomic_write

    def die_writing_epoch_3s_checkpoint(path, write, size=None):
        if path.endswith("checkpoint.pt") and len(open(tmp_path / "cut" / "metrics.jsonl")
                                                  .read().splitlines()) == 3:
            raise SystemExit("killed")
        real_write(path, write, size)

    monkeypatch.setattr(data, "atomic_write", die_writing_epoch_3s_checkpoint)
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    monkeypatch.setattr(data, "atomic_write", real_write)
    train.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    read = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text()  # noqa
                        .splitlines()]
    straight, cut = read("straight"), read("cut")
    assert [r["epoch"] for r in cut] == [1, 2, 3]  # no duplicate line
    for a, b in zip(straight, cut):
        assert a["loss"] == b["loss"] and a["optimizer_steps"] == b["optimizer_steps"]


def test_stale_temporaries_are_cleaned_up_and_nothing_else(tmp_path):
    out = tmp_path / "syn"
    os.makedirs(out)
    (out / "manifest.tmp4242.csv").write_text("half a manifest")  # beside files this set writes
    (out / "contact_sheet.tmp17.png").write_bytes(b"half a picture")
    (out / "notes.tmp.txt").write_text("the user's")  # not ours: stays
    (out / "keep.png").write_bytes(b"the user's")
    dafusion.main(["--out", str(out), "--examples-per-class", "2", "--per-image", "1",
                   "--ddpm-steps", "2", "--kinds", "id"])
    left = sorted(os.listdir(out))
    assert "manifest.tmp4242.csv" not in left and "contact_sheet.tmp17.png" not in left
    assert "notes.tmp.txt" in left and "keep.png" in left


# -----------------------------------------------------------------------------
# Small things


def test_supcon_help_prints_help():
    done = subprocess.run([sys.executable, "supcon.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout.lower()


def test_plots_draw_non_ascii_class_names_without_empty_boxes(tmp_path):
    names = ["螺丝", "écrou", "bolt"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)"
        evaluate.plot_confusion([[1, 0, 0], [0, 1, 0], [0, 0, 1]], names,
                                str(tmp_path / "c.png"), "names")
    assert data.drawable("écrou") == "écrou"  # Latin with accents: in the bundled font
    assert data.drawable("螺丝") in ("螺丝", "U+87BA U+4E1D")  # or the codes, never boxes


def test_a_train_steps_run_resumes_and_extends_from_its_partial_last_epoch(tmp_path):
    # 6 batches an epoch at --batch-size 16: 8 steps end 2 steps into the second epoch
    without_epochs = [a for i, a in enumerate(TINY) if "--epochs" not in TINY[max(0, i - 1):i + 1]]
    args = without_epochs + ["--batch-size", "16", "--out", str(tmp_path)]
    train.main(args + ["--name", "straight", "--train-steps", "11"])
    train.main(args + ["--name", "short", "--train-steps", "8"])
    state = torch.load(tmp_path / "short" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # where it stopped, not the next epoch
    result = train.main(["--resume", str(tmp_path / "short"), "--train-steps", "11",
                         "--device", "cpu"])
    assert result["optimizer_steps"] == 11
    log = [json.loads(x) for x in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert [r["optimizer_steps"] for r in log] == [6, 11]  # the partial line was replaced
    # the schedule now runs over 11 steps, so the weights are not the straight run's; but the
    # same 11 batches were drawn: the second epoch's loss is computed on the same images
    assert json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0]) \
        ["loss"] == log[0]["loss"]


def test_ctrl_c_after_the_last_step_of_an_epoch_resumes_exactly(tmp_path, monkeypatch):
    args = TINY + ["--epochs", "2", "--batch-size", "16", "--eval-every", "1", "--out",
                   str(tmp_path)]
    train.main(args + ["--name", "straight"])
    # in the first probe: after epoch 1's last update, before its line in metrics.jsonl
    stop_at_call(monkeypatch, train, "probe_accuracy", 1)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--name", "cut"])
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 6)  # every step of epoch 1 done, not closed
    train.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    assert_same_weights(tmp_path / "straight", tmp_path / "cut")
    read = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text()  # noqa
                        .splitlines()]
    assert [(r["epoch"], r["loss"]) for r in read("cut")] == \
        [(r["epoch"], r["loss"]) for r in read("straight")]


def test_a_folder_of_another_set_is_refused_not_mixed(tmp_path, capsys):
    out = str(tmp_path / "syn")
    base = ["--out", out, "--examples-per-class", "2", "--per-image", "2", "--ddpm-steps", "2"]
    dafusion.main(base)
    code, err = command("dafusion", base[:-4] + ["--per-image", "1", "--ddpm-steps", "2"], capsys)
    assert_one_line(code, err, "image(s) of another set")  # fewer variations: rows it drops
    code, err = command("dafusion", base + ["--guidance", "3"], capsys)
    assert_one_line(code, err, "--guidance 2.0, not 3.0")
    code, err = command("dafusion", base[:3] + ["3"] + base[4:], capsys)  # another few-shot set
    assert_one_line(code, err, "holds a DDPM trained with other settings (data differ)")
    assert dafusion.generate(dafusion.build_parser().parse_args(base)) == 0  # as it was: reused


def test_a_folders_ddpm_never_serves_other_data(tmp_path):
    s = data.load_data("digits", examples_per_class=2, ood_classes="")
    folder = str(tmp_path / "ddpm")
    dafusion.train_ddpm(s.train.images, s.train.labels, 10, folder, steps=2, batch_size=4)
    other = data.load_data("digits", examples_per_class=2, ood_classes="", seed=1)
    with pytest.raises(dafusion.GenerationError, match="other settings"):
        dafusion.train_ddpm(other.train.images, other.train.labels, 10, folder, steps=2,
                            batch_size=4)
    # a meta.json without the data's fingerprint (older, or edited): never reused either
    meta = os.path.join(folder, "meta.json")
    with open(meta, encoding="utf-8") as f:
        saved = json.load(f)
    del saved["data"]
    with open(meta, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    with pytest.raises(dafusion.GenerationError, match=r"other settings \(data differ\)"):
        dafusion.train_ddpm(s.train.images, s.train.labels, 10, folder, steps=2, batch_size=4)


def test_an_inpainting_mask_covers_its_object_after_cropping_and_resizing(tmp_path):
    image = np.zeros((30, 60, 3), dtype=np.uint8)  # a wide photo, the object off-centre
    image[10:20, 40:50] = (255, 0, 0)
    mask = np.zeros((30, 60), dtype=np.uint8)
    mask[10:20, 40:50] = 255
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    for resize in ("crop", "letterbox"):
        picture, cut = data.open_masked(str(tmp_path / "x.png"), str(tmp_path / "m.png"), 32,
                                        resize)
        red = np.asarray(picture)[..., 0] > 127
        white = np.asarray(cut) > 127
        assert (red & white).sum() / (red | white).sum() > 0.9, resize  # the same pixels


def test_evaluate_options_of_the_other_mode_are_refused(finished_run, tmp_path, capsys):
    code, err = command("evaluate", [str(finished_run), "--run", str(finished_run)], capsys)
    assert_one_line(code, err, "--run has no effect without --nearness")
    code, err = command("evaluate", ["--nearness", str(tmp_path), "--episodes", "5"], capsys)
    assert_one_line(code, err, "--episodes has no effect with --nearness")
    code, err = command("evaluate", ["--nearness", str(tmp_path)], capsys)
    assert_one_line(code, err, "no manifest.csv there")


def test_evaluate_ood_data_missing_or_holding_a_bad_image_is_one_line(finished_run, tmp_path,
                                                                       capsys):
    code, err = command("evaluate", [str(finished_run), "--ood-data", str(tmp_path / "none")],
                        capsys)
    assert_one_line(code, err, str(tmp_path / "none"))
    write_folder(tmp_path / "ood", classes=("x",), per_class=3, rgb=False)
    (tmp_path / "ood" / "x" / "broken.png").write_bytes(b"not a png")  # a cut download
    code, err = command("evaluate", [str(finished_run), "--ood-data", str(tmp_path / "ood")],
                        capsys)
    assert_one_line(code, err, "broken.png")
