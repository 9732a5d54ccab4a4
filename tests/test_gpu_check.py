"""benchmarks/gpu_check.py on the CPU: the script a lent GPU runs, with the tiny pipeline and small
N, so that on a GPU only the device differs. Every check passes; the only SKIPs are the fused
loss's gradient and memory, which need FlexAttention's CUDA backward."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_gpu_check_passes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check_cpu.txt"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == [line for line in done.stdout.splitlines()
                     if line.split(" ")[0] in ("INFO", "PASS", "FAIL", "SKIP")]  # --out = stdout
    status = [line.split(" ")[0] for line in lines]
    assert status[0] == "INFO" and "FAIL" not in status
    passed = [line for line in lines if line.startswith("PASS")]
    assert sum("stable diffusion" in line for line in passed) == 4  # fp16, bf16 x (img2img, inpaint)
    assert sum(line.startswith("PASS fused loss") for line in passed) == 3  # 2 forwards + time
    skipped = [line for line in lines if line.startswith("SKIP")]
    assert len(skipped) == 3 and all("no backward on the CPU" in line for line in skipped)
