"""Stages pin torch's CPU kernels (cmkd/determinism.py): a caller's instruction-set choice
cannot change the bytes a stage produces."""

import hashlib
import os
import subprocess
import sys

import pytest

from cmkd.determinism import PINNED_CPU_KERNELS, pin_cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few training steps of a small CNN (convolutions, matmuls, reductions: the kernels whose
# vectorised paths differ by instruction set); prints the capability and a hash of the weights.
TRAIN = r"""
import hashlib, stages, torch
torch.set_num_threads(1)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
for _ in range(20):
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""


def _run(**env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_KERNELS and k != "CMKD_CPU_KERNELS"}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", TRAIN], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    capability, digest = out.stdout.split()
    return capability, digest


def _has_avx512() -> bool:
    try:
        return " avx512f " in open("/proc/cpuinfo").read().replace("\n", " ")
    except OSError:
        return False


def test_stage_package_pins_kernels_whatever_the_caller_sets():
    pinned = _run()
    caller_avx512 = _run(ATEN_CPU_CAPABILITY="avx512", MKL_CBWR="AUTO")
    assert pinned[0] == caller_avx512[0] == "AVX2"
    assert pinned == caller_avx512


@pytest.mark.skipif(not _has_avx512(), reason="needs an AVX-512 machine to show the unpinned difference")
def test_unpinned_kernels_would_differ():
    """Shows the test above could fail: with the pin off, AVX-512 kernels give other weights."""
    native = _run(CMKD_CPU_KERNELS="native", ATEN_CPU_CAPABILITY="avx512")
    assert native[0] == "AVX512"
    assert native[1] != _run()[1]


def test_pin_refuses_to_run_after_torch_chose_its_kernels():
    code = "import os, torch; os.environ.pop('ATEN_CPU_CAPABILITY', None)\nfrom cmkd.determinism import pin_cpu_kernels\npin_cpu_kernels()"
    env = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_KERNELS}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if "AVX2" in subprocess.run([sys.executable, "-c", "import torch;print(torch.backends.cpu.get_cpu_capability())"],
                                env=env, capture_output=True, text=True).stdout:
        pytest.skip("this machine's native path is AVX2 already")
    assert out.returncode != 0 and "before torch is imported" in out.stderr


def test_native_mode_and_bad_mode():
    env = {"CMKD_CPU_KERNELS": "native"}
    assert pin_cpu_kernels(env) == {} and "ATEN_CPU_CAPABILITY" not in env
    with pytest.raises(SystemExit, match="CMKD_CPU_KERNELS"):
        pin_cpu_kernels({"CMKD_CPU_KERNELS": "fast"})
