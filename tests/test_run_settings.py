"""train.py --resume RUN and evaluate.py RUN read RUN/config.json strictly: a file that is
missing, empty, cut short, not a JSON object, another program's, lacking a setting every train.py
run has, or holding a value the command line would never give is refused in one line that names
the file (and the setting), with exit status 1, no traceback, and nothing written in the run
folder. A run folder of an older train.py, which lacks only options added since, still resumes
and evaluates (data.RUN_SETTINGS: the settings every version wrote)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import data
import evaluate
import train
from test_inputs import TINY, assert_one_line, command

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished TINY run, and its config.json as a dict."""
    out = tmp_path_factory.mktemp("runs")
    train.main(TINY + ["--out", str(out), "--name", "done"])
    with open(out / "done" / "config.json", encoding="utf-8") as f:
        return out / "done", json.load(f)


def run_folder(finished, tmp_path, config):
    """A copy of the finished run whose config.json holds `config` (text, or a dict as JSON;
    None: no config.json)."""
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    os.remove(run / "config.json")
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config, indent=2)
        (run / "config.json").write_text(text, encoding="utf-8")
    return run


def snapshot(folder):
    """{file name: bytes} of everything in the folder."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def with_setting(key, value):
    return lambda config: {**config, key: value}


def without(key):
    return lambda config: {k: v for k, v in config.items() if k != key}


def cut_short(config):
    text = json.dumps(config, indent=2)
    return text[:len(text) // 2]  # a write that stopped half-way


CASES = {  # name: (the config.json, from the finished run's settings; what the line says)
    "missing": (lambda config: None, ["no config.json there"]),
    "empty": (lambda config: "", ["config.json", "empty"]),
    "cut short": (cut_short, ["config.json", "not valid JSON", "line", "cut short"]),
    "not JSON": (lambda config: "lr = 0.001\nseed = 0\n", ["config.json", "not valid JSON"]),
    "not an object": (lambda config: "[1, 2, 3]", ["config.json", "holds a JSON list"]),
    "empty object": (lambda config: {}, ["config.json", "another program's", "'data'"]),
    "another program's": (lambda config: {"model_name_or_path": "bert-base-uncased",
                                          "learning_rate": 5e-05, "seed": 42},
                          ["config.json", "another program's"]),
    "lr missing": (without("lr"), ["config.json", "'lr' is missing"]),
    "loss missing": (without("loss"), ["config.json", "'loss' is missing"]),
    "lr text": (with_setting("lr", "abc"), ["config.json", "'lr' (--lr)", '"abc"', "number"]),
    "lr null": (with_setting("lr", None), ["config.json", "'lr' (--lr)", "null"]),
    "lr as text": (with_setting("lr", "0.001"), ["config.json", "'lr' (--lr)", '"0.001"']),
    "seed not an integer": (with_setting("seed", 1.5), ["config.json", "'seed'", "integer"]),
    "flag as text": (with_setting("download", "yes"), ["config.json", "'download'"]),
    # an option added after the first train.py, with a value its type refuses
    "added option": (with_setting("negative_data", 7), ["config.json", "'negative_data'"]),
    "val_fraction out of range": (with_setting("val_fraction", 1.5),
                                  ["config.json", "'val_fraction'", "1.5"]),
}
COMMANDS = {"resume": ("train", lambda run: ["--resume", str(run), "--device", "cpu"]),
            "evaluate": ("evaluate", lambda run: [str(run), "--no-pictures"])}


@pytest.mark.parametrize("how", COMMANDS)
@pytest.mark.parametrize("case", CASES)
def test_a_bad_config_is_refused_in_one_line_and_nothing_is_written(case, how, finished,
                                                                    tmp_path, capsys):
    make, needles = CASES[case]
    run = run_folder(finished, tmp_path, make(finished[1]))
    before = snapshot(run)
    script, argv = COMMANDS[how]
    code, err = command(script, argv(run), capsys)
    assert_one_line(code, err, str(run), *needles)
    assert code == 1
    assert snapshot(run) == before  # not one file written, changed or removed


# what only train.py's own parser can judge: evaluate.py reads the data options alone
TRAIN_ONLY = {
    "a key train.py never writes": (with_setting("pipeline_tag", "text-generation"),
                                    ["another program's", "'pipeline_tag'"]),
    "a loss that does not exist": (with_setting("loss", "hinge"), ["'loss'", "supcon"]),
    "lr zero": (with_setting("lr", 0), ["'lr'", "> 0"]),
    "an added option of the wrong type": (with_setting("warmup_steps", "ten"),
                                          ["'warmup_steps'", "ten"]),
}


@pytest.mark.parametrize("case", TRAIN_ONLY)
def test_resume_refuses_what_its_command_line_would_never_give(case, finished, tmp_path,
                                                               capsys):
    make, needles = TRAIN_ONLY[case]
    run = run_folder(finished, tmp_path, make(finished[1]))
    before = snapshot(run)
    code, err = command("train", ["--resume", str(run), "--device", "cpu"], capsys)
    assert_one_line(code, err, str(run / "config.json"), *needles)
    assert snapshot(run) == before


@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_the_empty_object_of_the_issue_is_one_line_from_a_real_process(script, finished,
                                                                       tmp_path):
    # {} used to start training and crash inside AdamW (lr None) with a traceback
    run = run_folder(finished, tmp_path, {})
    before = snapshot(run)
    argv = ["--resume", str(run), "--device", "cpu"] if script == "train" else [str(run)]
    done = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line(done.returncode, done.stderr, "error:", str(run / "config.json"),
                    "not the settings of a train.py run")
    assert done.returncode == 1 and snapshot(run) == before


def test_an_older_config_without_the_options_added_since_resumes_and_evaluates(finished,
                                                                              tmp_path,
                                                                              capsys):
    older = {k: v for k, v in finished[1].items() if k in data.RUN_SETTINGS}
    assert len(older) < len(finished[1])  # some options were added since the first train.py
    run = run_folder(finished, tmp_path, older)
    train.main(["--resume", str(run), "--epochs", "3", "--device", "cpu", "--no-report"])
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["train_steps"] is None  # added-later: its default
    # the two whose default now depends on the negatives: what every run before them did
    assert config["negative_mode"] == "denominators" and config["outlier_exposure"] == 0.0
    metrics = evaluate.evaluate_run(str(run), device="cpu", episodes=5, pictures=False)
    assert 0 <= metrics["test_accuracy"] <= 1


def test_every_setting_every_train_py_wrote_is_an_option_of_today(finished):
    # RUN_SETTINGS may name only options train.py still has, and writes
    assert set(data.RUN_SETTINGS) <= set(finished[1])
    parser = train.build_parser()
    defaults = vars(train.with_defaults(parser.parse_args([])))
    for key, kind in data.RUN_SETTINGS.items():  # the kind fits what train.py writes
        assert data._kind_problem(defaults[key], kind if isinstance(kind, tuple) else (kind,)) \
            == "", key
