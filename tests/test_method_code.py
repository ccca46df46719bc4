"""A run's code (cmkd/pipeline/codedeps.py, stage `method_code`) covers what its method really imports,
the registry finds methods without an index, and a new method module reruns only its stages."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from cmkd.pipeline.codedeps import methods_of_run, registered_methods, run_code
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

    on_disk = sorted(f"cmkd.methods.{p.stem}" for p in (REPO / "cmkd/methods").glob("*.py")
                     if not p.name.startswith("_"))
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
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], cwd=repo,
                   env=env, check=True)
    dvc(["repro", "evaluate@synthetic"], repo, env)
    (repo / "cmkd/methods/kd3.py").write_text(NEW_METHOD)
    params["runs"]["kd3"] = {"method": "kd3", "ce_weight": 0.5}
    params["methods"].append("kd3")
    # every run of `methods` declares a grid of the common budget (8 configurations)
    params["tuning"]["grids"]["kd3"] = {"ce_weight": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0]}
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
    from cmkd.pipeline.codedeps import closure, module_path, stage_code

    registry = registered_methods(REPO)
    used = methods_of_run(PARAMS["experiments"]) + ["teacher", "supervised"]
    modules = closure(REPO, ["cmkd.experiments.analysis"] + [registry[m] for m in used if m in registry])
    needed = {module_path(REPO, m).relative_to(REPO).as_posix() for m in modules}
    declared = set(stage_code(REPO, "stages/experiment.py", [PARAMS["experiments"], {"method": "teacher"},
                                                              {"method": "supervised"}]))
    assert needed | {"stages/experiment.py", "stages/_common.py"} <= declared
    assert "cmkd/methods/dkd.py" not in declared  # only the methods the experiments use
    for name, stage in DVC_YAML["stages"].items():
        if name.startswith("exp_"):
            assert stage["deps"] == ["data/method_code/stages/experiments.json"], name


def test_training_stages_depend_on_one_code_file_each():
    """dvc.lock is parsed and rewritten by DVC after every stage: a dozen source deps per training
    stage made it ~2x longer. The code files are folded into method_code's output."""
    stages = DVC_YAML["stages"]
    # (+ each role's model and training, data/resolved/: stages/resolve.py)
    assert stages["distill"]["deps"] == ["data/method_code/${item.run}.json", "data/prepared/${item.dataset}.h5",
                                         "data/runs/${item.dataset}/teacher",
                                         "data/resolved/${item.dataset}/teacher.json",
                                         "data/resolved/${item.dataset}/student.json"]
    assert stages["train_teacher"]["do"]["deps"] == ["data/method_code/stages/teacher.json", "data/prepared/${item}.h5",
                                                     "data/resolved/${item}/teacher.json"]
    assert stages["train_student"]["do"]["deps"] == ["data/method_code/stages/student.json", "data/prepared/${item}.h5",
                                                     "data/resolved/${item}/student.json"]
    assert {"stages", "cmkd"} <= set(stages["method_code"]["deps"])


def test_baseline_code_files_hold_the_supervised_module_and_no_distillation_method():
    from cmkd.config import STUDENT_RUN, TEACHER_RUN
    from cmkd.pipeline.codedeps import stage_code

    for baseline in (TEACHER_RUN, STUDENT_RUN):
        files = stage_code(REPO, "stages/train.py", baseline)
        assert "cmkd/methods/supervised.py" in files and "stages/train.py" in files
        assert not {"cmkd/methods/kd.py", "cmkd/methods/mfh.py"} & set(files)


def test_a_run_code_file_holds_the_training_code_and_only_its_method():
    from cmkd.pipeline.codedeps import stage_code

    kdv1 = stage_code(REPO, "stages/train.py", PARAMS["runs"]["kdv1"])
    for shared in ("stages/train.py", "stages/_common.py", "cmkd/training/loop.py", "cmkd/training/precision.py",
                   "cmkd/pipeline/train.py", "cmkd/data/loader.py", "cmkd/data/augment.py", "cmkd/training/metrics.py",
                   "cmkd/utils/determinism.py", "cmkd/pipeline/tuning.py", "cmkd/pipeline/layout.py",
                   "cmkd/utils/registry.py", "cmkd/models/cnn.py", "cmkd/models/segmentation.py",
                   "cmkd/methods/base.py", "cmkd/methods/kd.py", "cmkd/losses.py"):
        assert shared in kdv1, shared
    assert "cmkd/methods/dkd.py" not in kdv1 and "stages/experiment.py" not in kdv1


def test_a_changed_shared_file_changes_every_run_code_file_and_only_that_entry(tmp_path):
    from cmkd.pipeline.codedeps import stage_code

    repo = copy_pipeline(tmp_path / "repo")
    before = {run: stage_code(repo, "stages/train.py", PARAMS["runs"][run]) for run in ("kdv1", "mgkd")}
    engine = repo / "cmkd/training/loop.py"
    engine.write_text(engine.read_text() + "\n# touched\n")
    dkd = repo / "cmkd/methods/dkd.py"  # no part of kdv1 or mgkd
    dkd.write_text(dkd.read_text() + "\n# touched\n")
    for run, files in before.items():
        after = stage_code(repo, "stages/train.py", PARAMS["runs"][run])
        assert set(after) == set(files)
        assert {path for path in files if after[path] != files[path]} == {"cmkd/training/loop.py"}, run


def _cmkd_modules_imported(stderr: str) -> set[str]:
    # `PYTHONPROFILEIMPORTTIME=1` lines: "import time: self | cumulative | <indent>module"
    names = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return {n for n in names if n.split(".")[0] in ("cmkd", "stages")}


@pytest.mark.slow
def test_code_files_cover_what_the_training_and_experiment_stages_import(tmp_path):
    """Run the stages for real (forked seed workers included) and compare every cmkd module they
    import with the files their code file lists."""
    from cmkd.pipeline.codedeps import module_path

    repo = copy_pipeline(tmp_path / "repo")
    env = tool_env(tmp_path)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), methods=("mgkd", "kdv1_ntdh_feat"),
                         seeds=(0, 1))
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    dvc(["init", "-q"], repo, env)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)  # DVCLive needs a commit
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], cwd=repo,
                   env=env, check=True)
    dvc(["repro", "train_teacher@synthetic", "method_code"], repo, env)
    env = {**env, "PYTHONPROFILEIMPORTTIME": "1"}
    commands = {"mgkd.json": ["train", "--dataset", "synthetic", "--run", "mgkd"],
                "kdv1_ntdh_feat.json": ["train", "--dataset", "synthetic", "--run", "kdv1_ntdh_feat"],
                "stages/student.json": ["train", "--dataset", "synthetic", "--role", "student"],
                "stages/experiments.json": ["experiment", "mfh_alg1"]}
    # what the up-front check of the whole params file imports (every run's and dataset's modules):
    # it can stop a stage, never change its outputs, so the code files do not list it
    check = subprocess.run([sys.executable, "-c", "from cmkd.config import load_params, validate_params; "
                            "validate_params(load_params('params.yaml'))"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True)
    validation = {module_path(repo, m).relative_to(repo).as_posix() for m in _cmkd_modules_imported(check.stderr)}
    assert "cmkd/config.py" in validation
    for code_file, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", "stages", *args, "--no-progress"], cwd=repo, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        declared = set(json.loads((repo / "data/method_code" / code_file).read_text())["files"])
        imported = {module_path(repo, m).relative_to(repo).as_posix() for m in _cmkd_modules_imported(proc.stderr)
                    if module_path(repo, m) is not None}
        assert imported, args
        undeclared = imported - declared - validation
        assert not undeclared, f"{code_file}: {sorted(undeclared)} imported, not declared"
    mgkd = set(json.loads((repo / "data/method_code/mgkd.json").read_text())["files"])
    assert "cmkd/methods/dkd.py" not in mgkd and "cmkd/methods/mfh.py" in mgkd
