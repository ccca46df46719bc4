"""benchmarks/gpu_check.py runs: its CPU mode (`--device cpu`) takes the GPU check's own path
(loader, the presets' networks, the AMP switch, the optimiser step) at a reduced size."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_runs_on_the_cpu_and_writes_its_results(tmp_path):
    out = tmp_path / "gpu_check_cpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and (result["steps"], result["warmup"]) == (1, 1)
    kitti, sun = result["semantickitti"], result["sunrgbd"]
    assert kitti["row_shape"] == [64, 256] and kitti["batch_size"] == 2 and sun["image_size"] == 64
    runs = [kitti[f"{role}_amp_{amp}"] for role in ("teacher", "student") for amp in ("off", "on")]
    runs += [sun["student_amp_off"], sun["student_amp_on"]]
    for run in runs:
        assert run["loss_finite"] is True and run["step_s"] > 0 and run["samples_per_s"] > 0
        assert 0 <= run["loader_wait_share"] < 1 and run["peak_rss_gib"] > 0
        assert run["autocast"] == "float32"  # AMP "auto" keeps float32 on the CPU
    assert "semantickitti teacher amp False" in proc.stdout


def test_gpu_check_without_cuda_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = ("import runpy, sys, torch; torch.cuda.is_available = lambda: False; "
            f"sys.argv = ['gpu_check.py', '--out', {str(out)!r}]; "
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and not out.exists()
