"""The layering a reader can draw: supcon.py and data.py import no project file, dafusion.py
imports data, evaluate.py imports supcon and data, train.py imports all four. Checked on the
source (every import, deferred ones inside functions included) and on a fresh interpreter."""

import ast
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPTS = ("supcon", "data", "dafusion", "evaluate", "train")
ALLOWED = {"supcon": set(), "data": set(), "dafusion": {"data"}, "evaluate": {"supcon", "data"},
           "train": {"supcon", "data", "dafusion", "evaluate"}}


def project_imports(name):
    """Every project module `name`.py imports anywhere in its source."""
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(SCRIPTS)


def test_each_script_imports_only_the_layers_below_it():
    for name in SCRIPTS:
        assert project_imports(name) == ALLOWED[name], name


def test_import_evaluate_loads_neither_train_nor_dafusion_nor_diffusers():
    code = ("import sys, evaluate; "
            "print(sorted(m for m in ('train', 'dafusion', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_supcon_runs_alone_in_an_empty_folder(tmp_path):
    # the file people copy: it works with nothing of the project beside it
    with open(os.path.join(ROOT, "supcon.py"), encoding="utf-8") as f:
        (tmp_path / "supcon.py").write_text(f.read(), encoding="utf-8")
    code = ("import torch, supcon; z = torch.randn(6, 2, 4); "
            "print(float(supcon.supcon_loss(z, torch.tensor([0, 0, 1, 1, 2, 2]))) > 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


def test_the_losses_need_torch_alone(tmp_path):
    # torchvision is imported inside resnet() only: with it missing, supcon.py still imports and
    # every loss runs (the encoders but ResNet too)
    with open(os.path.join(ROOT, "supcon.py"), encoding="utf-8") as f:
        (tmp_path / "supcon.py").write_text(f.read(), encoding="utf-8")
    code = ("import sys; sys.modules['torchvision'] = None; import torch, supcon; "
            "z = torch.randn(6, 2, 4); y = torch.tensor([0, 0, 1, 1, 2, 2]); "
            "print(all(float(v) > 0 for v in (supcon.supcon_loss(z, y), "
            "supcon.SupConLoss()(z, y), supcon.triplet_loss(z[:, 0], y), "
            "supcon.cosine_pair_loss(z[:, 0], y))), type(supcon.SmallCNN()).__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0 and done.stdout.split() == ["True", "SmallCNN"], done.stderr[-2000:]
