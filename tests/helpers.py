"""Small things several test files do: stop a run at the n-th call of something, and compare
the weights two runs saved."""

import torch

import data


def stop_at_call(monkeypatch, module, name, n, error=KeyboardInterrupt):
    """module.name raises `error` on its n-th call (a Ctrl-C, or a kill) and works otherwise.
    Returns the original, to put back with monkeypatch.setattr."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return real


def stop_at_image(monkeypatch, n):
    """A Ctrl-C while the n-th generated image (not the contact sheet) is being written."""
    real, calls = data.atomic_write, {"n": 0}

    def write(path, writer, size=None):
        if path.endswith(".png") and "contact_sheet" not in path:
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
        real(path, writer, size)

    monkeypatch.setattr(data, "atomic_write", write)
    return real


def assert_same_weights(run_a, run_b, parts=("model",)):
    """The model.pt of two run folders hold bit-identical weights."""
    a = torch.load(run_a / "model.pt", weights_only=True)
    b = torch.load(run_b / "model.pt", weights_only=True)
    for part in parts:
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
