"""A run's code (cmkd/codedeps.py, stage `method_code`) covers what its method really imports,
the registry finds methods without an index, and a new method module reruns only its stages."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from cmkd.codedeps import methods_of_run, registered_methods, run_code
from tests.conftest import REPO, copy_pipeline, dvc, stages_run, tiny_params, tool_env

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())

# Imports each method in a forked child (torch & co. imported once, before the forks) and prints
# {method: [files of the cmkd modules loaded]}: what a lookup of that method alone imports.
_PROBE = textwrap.dedent("""
    import json, os, sys
    import torch, numpy, h5py  # third-party, imported once before forking
    methods = json.loads(sys.argv[1])
    out = {}
    for m in methods:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            from cmkd.methods import get_method
            get_method(m)
            files = sorted(os.path.relpath(mod.__file__) for name, mod in list(sys.modules.items())
                           if name.split(".")[0] == "cmkd" and getattr(mod, "__file__", None))
            os.write(w, json.dumps(files).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        out[m] = json.loads(data)
    print(json.dumps(out))
""")


def test_registry_finds_every_decorated_method_without_an_index():
    from cmkd.methods import available_methods, method_modules

    on_disk = sorted(f"cmkd.methods.{p.stem}" for p in (REPO / "cmkd/methods").glob("*.py") if not p.name.startswith("_"))
    assert method_modules() == on_disk
    # the source scan the stage relies on agrees with what importing registers
    assert sorted(registered_methods(REPO)) == available_methods()


@pytest.mark.skipif(sys.platform != "linux", reason="forks")
def test_declared_code_covers_what_each_run_imports():
    methods = sorted({m for run in PARAMS["runs"].values() for m in methods_of_run(run)})
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(methods)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    imported = json.loads(proc.stdout)
    for name, run in PARAMS["runs"].items():
        declared = set(run_code(REPO, run))
        loaded = set().union(*(imported[m] for m in methods_of_run(run)))
        assert loaded <= declared, f"runs.{name}: imports {sorted(loaded - declared)} not in its method_code"


def test_wrapped_and_imported_methods_are_part_of_a_run():
    runs = PARAMS["runs"]
    assert "cmkd/methods/kd.py" in run_code(REPO, runs["kdv1_ntdh"])  # ntdh_mask wraps kd
    assert "cmkd/methods/ntdh.py" in run_code(REPO, runs["kdv1_ntdh"])
    assert "cmkd/methods/discom.py" in run_code(REPO, runs["mgkd"])  # imports reinitialised_copy
    assert "cmkd/methods/discom.py" not in run_code(REPO, runs["kdv1"])
    assert "cmkd/methods/ntdh.py" not in run_code(REPO, runs["kdv1"])


def test_distill_stages_depend_on_their_run_code_not_the_methods_folder():
    deps = DVC_YAML["stages"]["distill"]["deps"]
    assert "cmkd/methods" not in deps
    assert "data/method_code/${item.run}.json" in deps
    assert "data/method_code" in [next(iter(o)) if isinstance(o, dict) else o
                                  for o in DVC_YAML["stages"]["method_code"]["outs"]]


NEW_METHOD = '''
"""A test method: KDv2 with a fixed temperature of 3."""
from cmkd.losses import cross_entropy, kd_loss
from cmkd.methods import register
from cmkd.methods.logit import LogitDistiller


@register("kd3")
class KD3(LogitDistiller):
    defaults = {"ce_weight": 0.5}

    def forward(self, batch):
        s = self.student(batch["student_input"])
        t = self.teacher_logits(batch)
        return {"kd": kd_loss(s, t, 3.0, mask=self.kd_weights(batch, s, t)),
                "ce": self.cfg["ce_weight"] * cross_entropy(s, batch["target"])}
'''


@pytest.mark.slow
def test_a_new_method_module_reruns_only_its_own_stages(tmp_path):
    repo = copy_pipeline(tmp_path / "repo")
    env = tool_env(tmp_path)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), methods=("kdv1", "kdv1_ntdh"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    dvc(["init", "-q"], repo, env)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], cwd=repo, env=env, check=True)
    dvc(["repro", "evaluate@synthetic"], repo, env)
    (repo / "cmkd/methods/kd3.py").write_text(NEW_METHOD)
    params["runs"]["kd3"] = {"method": "kd3", "ce_weight": 0.5}
    params["methods"].append("kd3")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc(["repro", "evaluate@synthetic"], repo, env)
    assert stages_run(out.stdout) == {"method_code", "distill@synthetic-kd3", "evaluate@synthetic"}
    report = json.loads((repo / "data/reports/synthetic/metrics.json").read_text())
    assert "kd3" in report["rows"]
    # editing the wrapped method's module reruns the runs using it (kdv1 and kdv1_ntdh), not kd3
    kd = repo / "cmkd/methods/kd.py"
    kd.write_text(kd.read_text() + "\n# touched\n")
    out = dvc(["repro", "evaluate@synthetic"], repo, env)
    # (evaluate reruns only if the retrained runs' outputs differ: a comment leaves them identical)
    assert stages_run(out.stdout) - {"evaluate@synthetic"} == {
        "method_code", "distill@synthetic-kdv1", "distill@synthetic-kdv1_ntdh"}


def test_experiment_stages_declare_every_method_module_they_use():
    from cmkd.codedeps import closure, module_path

    registry = registered_methods(REPO)
    used = methods_of_run(PARAMS["experiments"]) + ["teacher", "supervised"]
    modules = closure(REPO, ["cmkd.analysis"] + [registry[m] for m in used if m in registry])
    needed = {module_path(REPO, m).relative_to(REPO).as_posix() for m in modules if m.startswith("cmkd.methods")}
    for name, stage in DVC_YAML["stages"].items():
        if name.startswith("exp_"):
            deps = set(stage["deps"])
            assert "cmkd/methods" not in deps
            assert needed <= deps, f"{name}: add {sorted(needed - deps)} to its deps"
