"""Stages pin torch's CPU kernels (cmkd/utils/determinism.py): a caller's instruction-set choice
cannot change the bytes a stage produces. The pinning is the entry point's (`python -m stages
<name>`, stages/__main__.py); importing the `stages` package or a stage module changes nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmkd.utils.determinism import PINNED_CPU_KERNELS, pin_cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stage of its own for these tests, run through the real entry point (`python -m stages
# probe_kernels <what>`) in a copy of the code. `train`: a few training steps of a small CNN
# (convolutions, matmuls, reductions: the kernels whose vectorised paths differ by instruction
# set), printing the capability and a hash of the weights; `environ`: the stage's environment;
# `provenance`: cmkd.utils.determinism.provenance().
PROBE_STAGE = r"""
import json, os, sys

if sys.argv[1] == "environ":
    print(json.dumps(dict(os.environ)))
elif sys.argv[1] == "provenance":
    from cmkd.utils.determinism import provenance
    print(json.dumps(provenance()))
else:
    import hashlib, torch
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


@pytest.fixture(scope="module")
def probe_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("probe")
    for name in ("cmkd", "stages"):
        shutil.copytree(os.path.join(ROOT, name), repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "stages" / "probe_kernels.py").write_text(PROBE_STAGE)
    return repo


def _caller_env(**overrides: str) -> dict[str, str]:
    """This environment without the pins (conftest set them in the test process), plus overrides."""
    env = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_KERNELS and k != "CMKD_CPU_KERNELS"}
    env.pop("PYTHONPATH", None)
    return {**env, **overrides}


def _stage(repo: Path, what: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "stages", "probe_kernels", what], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _run(repo: Path, **env_overrides):
    capability, digest = _stage(repo, "train", _caller_env(**env_overrides)).split()
    return capability, digest


def _has_avx512() -> bool:
    try:
        return " avx512f " in open("/proc/cpuinfo").read().replace("\n", " ")
    except OSError:
        return False


def test_stage_process_pins_kernels_whatever_the_caller_sets(probe_repo):
    pinned = _run(probe_repo)
    caller_avx512 = _run(probe_repo, ATEN_CPU_CAPABILITY="avx512", MKL_CBWR="AUTO")
    assert pinned[0] == caller_avx512[0] == "AVX2"
    assert pinned == caller_avx512


@pytest.mark.skipif(not _has_avx512(), reason="needs an AVX-512 machine to show the unpinned difference")
def test_unpinned_kernels_would_differ(probe_repo):
    """Shows the test above could fail: with the pin off, AVX-512 kernels give other weights."""
    native = _run(probe_repo, CMKD_CPU_KERNELS="native", ATEN_CPU_CAPABILITY="avx512")
    assert native[0] == "AVX512"
    assert native[1] != _run(probe_repo)[1]


def test_pin_refuses_to_run_after_torch_chose_its_kernels():
    code = ("import os, torch; os.environ.pop('ATEN_CPU_CAPABILITY', None)\n"
            "from cmkd.utils.determinism import pin_cpu_kernels\npin_cpu_kernels()")
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


# --- Kernels no switch pins: MKL's vector math (cmkd/utils/exactmath.py) ---------------------------

def test_vendor_independent_mkl_mode_is_pinned(probe_repo):
    """MKL_CBWR=AVX2 is an Intel-only branch (MKL takes its own path on other vendors);
    COMPATIBLE is the mode Intel documents as identical on Intel and non-Intel CPUs."""
    assert PINNED_CPU_KERNELS["MKL_CBWR"] == "COMPATIBLE"
    environ = json.loads(_stage(probe_repo, "environ", _caller_env(MKL_CBWR="AUTO")))
    pins = [environ["MKL_CBWR"], environ["ATEN_CPU_CAPABILITY"], environ["ONEDNN_MAX_CPU_ISA"]]
    assert pins == ["COMPATIBLE", "avx2", "AVX2"]


def test_stage_environment_is_the_callers_plus_the_pins_only(probe_repo):
    caller = _caller_env(ATEN_CPU_CAPABILITY="avx512", CMKD_PROBE="kept")
    environ = json.loads(_stage(probe_repo, "environ", caller))
    assert environ == {**caller, **PINNED_CPU_KERNELS}
    native = _caller_env(CMKD_CPU_KERNELS="native", ATEN_CPU_CAPABILITY="avx512")
    assert json.loads(_stage(probe_repo, "environ", native)) == native


def test_importing_stages_and_every_stage_module_leaves_the_environment_alone():
    modules = sorted(f"stages.{p.stem}" for p in Path(ROOT, "stages").glob("*.py") if p.stem != "__init__")
    assert {"stages.__main__", "stages._common", "stages.train", "stages.experiment"} <= set(modules)
    code = ("import importlib, json, os, sys\nbefore = dict(os.environ)\nimport stages\n"
            "for name in sys.argv[1:]:\n    importlib.import_module(name)\n"
            "print(json.dumps([before, dict(os.environ), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, env=_caller_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after, torch_imported = json.loads(out.stdout)
    assert torch_imported  # the stage modules were really imported (train imports torch)
    assert after == before


@pytest.mark.skipif(not pin_cpu_kernels({}), reason="nothing is pinned off x86-64")
def test_a_stage_started_without_the_entry_point_refuses_to_run(tmp_path):
    """`python -m stages.check` bypasses stages/__main__.py: unpinned kernels, so the stage stops."""
    out = subprocess.run([sys.executable, "-m", "stages.check", "--params", str(tmp_path / "params.yaml")], cwd=ROOT,
                         env=_caller_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "python -m stages <name>" in out.stderr, out.stderr


def test_provenance_names_the_machine_and_every_kernel_switch(probe_repo):
    prov = json.loads(_stage(probe_repo, "provenance", _caller_env()))
    assert prov["cpu_vendor"] not in ("", None) and prov["cpu_model"] not in ("", None)
    if os.path.exists("/proc/cpuinfo"):
        assert prov["cpu_vendor"] in open("/proc/cpuinfo").read()
    assert (prov["aten_cpu_capability"], prov["mkl_cbwr"], prov["onednn_max_cpu_isa"]) == ("avx2", "COMPATIBLE", "AVX2")
    assert prov["cpu_capability"] == "AVX2" and isinstance(prov["mkldnn_enabled"], bool) and prov["threads"] >= 1


def test_exactmath_is_correctly_rounded_where_torch_float32_need_not_be():
    import numpy as np
    import torch

    from cmkd.utils import exactmath

    g = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=g) * 10.0 ** torch.randint(-20, 20, (200_000,), generator=g).float()
    x = torch.cat([x, torch.tensor([0.0, 1.0, 4.0, float("inf")])])
    ref = np.sqrt(x.numpy().astype(np.float64)).astype(np.float32)  # innocuous double rounding
    assert np.array_equal(exactmath.sqrt(x).numpy(), ref)
    y = torch.randn(200_000, generator=g) * 20
    with np.errstate(over="ignore"):
        ref_exp = np.exp(y.numpy().astype(np.float64)).astype(np.float32)
    assert np.array_equal(exactmath.exp(y).numpy(), ref_exp)
    p = y.abs() + 1e-6
    assert np.array_equal(exactmath.log(p).numpy(), np.log(p.numpy().astype(np.float64)).astype(np.float32))
    assert exactmath.sqrt(torch.tensor([-1.0])).isnan().all()
    assert exactmath.exp(y).dtype == exactmath.sqrt(x).dtype == torch.float32
    # the same functions as torch's, gradients included, to float32 precision
    z = torch.randn(64, 7, generator=g, requires_grad=True)
    w = z.detach().clone().requires_grad_()
    torch.testing.assert_close(exactmath.logsumexp(z, 1), torch.logsumexp(w, 1))
    torch.testing.assert_close(exactmath.logaddexp(z, z.flip(1)), torch.logaddexp(w, w.flip(1)))
    (exactmath.logsumexp(z, 1).sum() + exactmath.logaddexp(z, 2 * z).sum()).backward()
    (torch.logsumexp(w, 1).sum() + torch.logaddexp(w, 2 * w).sum()).backward()
    torch.testing.assert_close(z.grad, w.grad)
    big = torch.tensor([[1000.0, 999.0], [-1000.0, -1001.0]])
    torch.testing.assert_close(exactmath.logsumexp(big, 1), torch.logsumexp(big, 1))


def _vml_calls(run) -> set[str]:
    """aten ops served by MKL's vector math on float32 CPU tensors, nested calls included."""
    from torch.profiler import ProfilerActivity, profile

    from cmkd.utils.exactmath import VML_SERVED_OPS

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    return {e.name() for e in prof.profiler.kineto_results.events()
            if e.name().removeprefix("aten::").rstrip("_") in VML_SERVED_OPS and "float" in e.dtypes()}


def test_the_profiler_sees_vml_calls_nested_in_other_ops():
    """Shows the test below could fail: logsumexp's kernel and logaddexp's gradient call exp."""
    import torch

    x = torch.randn(8, 5, requires_grad=True)
    assert _vml_calls(lambda: torch.logsumexp(x, 1)) == {"aten::exp_", "aten::log_"}
    assert _vml_calls(lambda: torch.logaddexp(x, 2 * x).sum().backward()) == {"aten::exp"}
    param = torch.nn.Parameter(torch.randn(10))
    param.grad = torch.randn(10)
    assert _vml_calls(torch.optim.Adam([param], fused=False).step) == {"aten::sqrt"}
    assert _vml_calls(torch.optim.Adam([param], fused=True).step) == set()


@pytest.mark.parametrize("kind", ["vectors", "images"])
def test_a_training_epoch_of_every_run_reaches_no_float32_vml_kernel(kind, tmp_path, one_thread):
    """Every run of params.yaml (with its tuned selection), teacher and student included, trains
    an epoch (its `prepare` first, e.g. MFH's Algorithm 1) without MKL's machine-dependent
    vector math: on CPU its weights are then the same bits on AVX-512 and AVX2-only machines."""
    import torch
    import yaml

    from cmkd.config import STUDENT_RUN, TEACHER_RUN
    from cmkd.data.h5 import read_attrs
    from cmkd.methods import build_distiller, get_method
    from cmkd.models import build_model
    from cmkd.pipeline.tuning import load_tuned, tuned_run_config
    from cmkd.training.config import TrainConfig
    from cmkd.training.data import SplitData, load_split
    from cmkd.training.loop import fit
    from tests.conftest import tiny_synthetic_file

    params = yaml.safe_load(open(os.path.join(ROOT, "params.yaml")))
    tuned = load_tuned(os.path.join(ROOT, "tuned.yaml"))
    if kind == "vectors":
        prepared, dataset = tiny_synthetic_file(tmp_path / "tiny.h5"), "synthetic"
        arch = params["models"]["synthetic"]["student"]
    else:
        from cmkd.data.datasets import digits

        prepared, dataset = tmp_path / "digits.h5", "digits"
        digits.prepare({"image_size": 8, "blend": 0.5, "split": [0.6, 0.2, 0.2], "seed": 0}, tmp_path, prepared)
        arch = {"arch": "small_cnn", "width": 4}
    attrs = read_attrs(prepared)
    classes = len(attrs["class_names"])

    def subset(split, n):
        data = load_split(prepared, split, attrs, in_memory=True)
        return SplitData.from_arrays(**{k: v[:n] for k, v in data.tensors.items()})

    train, val = subset("train", 96), subset("val", 32)
    runs = {"teacher": TEACHER_RUN, "student": STUDENT_RUN}
    runs.update({name: tuned_run_config(params["runs"][name], tuned, dataset, name)[0] for name in params["methods"]})
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu", optimizer="adam")
    checked = []
    for name, run_cfg in runs.items():
        method = get_method(run_cfg["method"])
        if kind == "vectors" and "vector" not in method.inputs or kind == "images" and "image" not in method.inputs:
            continue
        torch.manual_seed(0)
        teacher = build_model(arch, train.sample_shape("teacher_input"), classes)
        student = build_model(arch, train.sample_shape("student_input"), classes)
        if run_cfg["method"] == "teacher":
            student, teacher = teacher, None
        d = build_distiller(dict(run_cfg), student=student, teacher=teacher, num_classes=classes)

        def one_epoch():
            if hasattr(d, "prepare"):
                d.prepare(train, val, cfg, task="classification", num_classes=classes,
                          ignore_index=None, progress=False)
            fit(d, train, val, cfg, task="classification", num_classes=classes, progress=False)

        assert _vml_calls(one_epoch) == set(), name
        checked.append(name)
    assert {"teacher", "student", "kdv1", "dkd", "c2kd", "mlkd", "crd"} <= set(checked)
