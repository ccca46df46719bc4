"""Prefect flows over a tiny DVC project built in a temporary folder (git + DVC, four stages
including a `foreach` and a `matrix`), so these tests do not depend on the real pipeline's speed.

Expected values are computed here by hand from the tiny project's formulas:
prepare writes gamma; distill's score = gamma * runs.<run>.scale + seed; evaluate's best_score
is the maximum over the run x seed scores; check's claim "m2 beats m1" compares two scores.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cmkd.errors import ConfigError
from tests.conftest import ALWAYS_CHANGED

PY = shlex.quote(sys.executable)

PARAMS = {
    "datasets": ["tiny"],
    "methods": ["m1", "m2"],
    "seeds": [0],
    "runs": {"m1": {"scale": 2.0}, "m2": {"scale": 3.0}},
    "data": {"synthetic": {"gamma": 0.5}},
}

SCRIPTS = {
    "prepare.py": """
        import json, os, sys, yaml
        dataset = sys.argv[1]
        gamma = yaml.safe_load(open("params.yaml"))["data"]["synthetic"]["gamma"]
        print(f"PREPARE-LOG dataset={dataset} gamma={gamma}")
        os.makedirs("data/prepared", exist_ok=True)
        json.dump({"gamma": gamma}, open(f"data/prepared/{dataset}.json", "w"))
    """,
    "distill.py": """
        import json, os, sys, yaml
        dataset, run, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
        scale = yaml.safe_load(open("params.yaml"))["runs"][run]["scale"]
        gamma = json.load(open(f"data/prepared/{dataset}.json"))["gamma"]
        os.makedirs(f"data/runs/{dataset}", exist_ok=True)
        json.dump({"score": gamma * scale + seed}, open(f"data/runs/{dataset}/{run}-{seed}.json", "w"))
    """,
    "evaluate.py": """
        import json, os, sys, yaml
        dataset = sys.argv[1]
        p = yaml.safe_load(open("params.yaml"))
        scores = {r: {f"seed{s}": json.load(open(f"data/runs/{dataset}/{r}-{s}.json"))["score"]
                      for s in p["seeds"]} for r in p["methods"]}
        best = max(v for per_seed in scores.values() for v in per_seed.values())
        os.makedirs(f"data/reports/{dataset}", exist_ok=True)
        json.dump({"runs": scores, "best_score": best}, open(f"data/reports/{dataset}/metrics.json", "w"))
        rows = "".join(f"| {r} | {max(v.values())} |\\n" for r, v in scores.items())
        open(f"data/reports/{dataset}/table.md", "w").write("| run | score |\\n|---|---|\\n" + rows)
    """,
    "check.py": """
        import json
        m = json.load(open("data/reports/tiny/metrics.json"))["runs"]
        holds = "m1" in m and "m2" in m and max(m["m2"].values()) > max(m["m1"].values())
        open("data/reports/claims.md", "w").write(f"| claim | holds |\\n|---|---|\\n| m2 beats m1 | {holds} |\\n")
        json.dump({"m2_beats_m1": holds}, open("claims_summary.json", "w"))
    """,
    "flaky.py": """
        import os, sys
        if not os.path.exists(".flaky-marker"):
            open(".flaky-marker", "w").write("failed once")
            sys.exit("TRANSIENT: flaky stage lost its connection, try again")
        open("data/flaky.txt", "w").write("ok")
    """,
    "broken.py": """
        import sys
        print("broken stage starting")
        sys.exit("FATAL: broken stage cannot open its input")
    """,
    "after.py": """
        open("data/after.txt", "w").write("never")
    """,
    "hold.py": """
        import sys, time
        start = time.time()
        time.sleep(2.5)
        open(f"data/{sys.argv[1]}.txt", "w").write(f"{start} {time.time()}")
    """,
}

CORE_STAGES = {
    "prepare": {
        "foreach": "${datasets}",
        "do": {
            "cmd": f"{PY} prepare.py ${{item}}",
            "deps": ["prepare.py"],
            "params": ["data.synthetic.gamma"],
            "outs": ["data/prepared/${item}.json"],
        },
    },
    "distill": {
        "matrix": {"dataset": "${datasets}", "run": "${methods}", "seed": "${seeds}"},
        "cmd": f"{PY} distill.py ${{item.dataset}} ${{item.run}} ${{item.seed}}",
        "deps": ["distill.py", "data/prepared/${item.dataset}.json"],
        "params": ["runs.${item.run}"],
        "outs": ["data/runs/${item.dataset}/${item.run}-${item.seed}.json"],
    },
    "evaluate": {
        "foreach": "${datasets}",
        "do": {
            "cmd": f"{PY} evaluate.py ${{item}}",
            "deps": ["evaluate.py", "data/runs/${item}"],
            "params": ["methods", "seeds"],
            "outs": ["data/reports/${item}/table.md"],
            "metrics": ["data/reports/${item}/metrics.json"],
        },
    },
    "check": {
        "cmd": f"{PY} check.py",
        "deps": ["check.py", "data/reports/tiny/metrics.json"],
        "outs": ["data/reports/claims.md"],
        "metrics": [{"claims_summary.json": {"cache": False}}],
    },
}

FLAKY_STAGES = {
    "prepare": CORE_STAGES["prepare"],
    "flaky": {"cmd": f"{PY} flaky.py", "deps": ["flaky.py", "data/prepared/tiny.json"],
              "outs": ["data/flaky.txt"]},
}

BROKEN_STAGES = {
    "prepare": CORE_STAGES["prepare"],
    "broken": {"cmd": f"{PY} broken.py", "deps": ["broken.py", "data/prepared/tiny.json"],
               "outs": ["data/broken.txt"]},
    "after": {"cmd": f"{PY} after.py", "deps": ["after.py", "data/broken.txt"],
              "outs": ["data/after.txt"]},
}


# Independent stages, each sleeping 2.5 s: two declare 2 intra-op threads (`meta`), one does not.
THREADED_STAGES = {
    "wide_a": {"cmd": f"{PY} hold.py wide_a", "deps": ["hold.py"], "outs": ["data/wide_a.txt"],
               "meta": {"threads": 2}},
    "wide_b": {"cmd": f"{PY} hold.py wide_b", "deps": ["hold.py"], "outs": ["data/wide_b.txt"],
               "meta": {"threads": 2}},
    "narrow": {"cmd": f"{PY} hold.py narrow", "deps": ["hold.py"], "outs": ["data/narrow.txt"]},
}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def make_project(root: Path, stages: dict) -> Path:
    """git init + commit, dvc init, params.yaml, dvc.yaml with `stages`, the scripts."""
    root.mkdir(parents=True)
    git(root, "init", "-q")
    git(root, "config", "user.name", "cmkd tests")
    git(root, "config", "user.email", "tests@cmkd.invalid")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.autostage", "false")
    (root / "params.yaml").write_text("# tiny project\n" + yaml.safe_dump(PARAMS, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    for name, body in SCRIPTS.items():
        (root / name).write_text(textwrap.dedent(body).lstrip())
    (root / "data").mkdir()
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny project")
    return root


def score(gamma: float, scale: float, seed: int) -> float:
    return gamma * scale + seed


@pytest.fixture(scope="module")
def dvc_env(tmp_path_factory):
    """DVC without analytics, a private HOME and site cache (module-wide: projects outlive tests)."""
    base = tmp_path_factory.mktemp("dvc-env")
    (base / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(base / "home"))
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("DVC_SITE_CACHE_DIR", str(base / "site-cache"))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        yield base


# --- no Prefect needed -------------------------------------------------------------------


def test_stage_plan_comes_from_dvc_graph(tmp_path, dvc_env):
    from flows.stage_graph import read_stage_plan

    root = make_project(tmp_path / "p", CORE_STAGES)
    plan = read_stage_plan(root)
    upstream = {s.name: set(s.upstream) for s in plan}
    # By hand from dvc.yaml: foreach -> prepare@tiny; matrix -> distill@tiny-<run>-<seed>.
    assert upstream == {
        "prepare@tiny": set(),
        "distill@tiny-m1-0": {"prepare@tiny"},
        "distill@tiny-m2-0": {"prepare@tiny"},
        "evaluate@tiny": {"distill@tiny-m1-0", "distill@tiny-m2-0"},
        "check": {"evaluate@tiny"},
    }
    position = {s.name: i for i, s in enumerate(plan)}
    for name, ups in upstream.items():
        assert all(position[u] < position[name] for u in ups)


def _project_with_params_check(root: Path) -> Path:
    """A project whose `python -m stages validate --params PATH` copies the params it is given
    to seen.yaml (so a test sees what the project's check saw) and refuses a negative scale."""
    (root / "stages").mkdir(parents=True)
    (root / "stages" / "__init__.py").write_text("")
    (root / "stages" / "validate.py").write_text("")
    (root / "stages" / "__main__.py").write_text(textwrap.dedent("""
        import shutil, sys, yaml
        path = sys.argv[sys.argv.index("--params") + 1]
        shutil.copy(path, "seen.yaml")
        if yaml.safe_load(open(path))["runs"]["m1"]["scale"] < 0:
            sys.exit("error: runs.m1.scale: must be >= 0")
    """))
    (root / "params.yaml").write_text("# tiny\n" + yaml.safe_dump(PARAMS, sort_keys=False))
    return root


def test_overrides_are_checked_as_dvc_applies_them(tmp_path):
    from flows.overrides import ParamsCheckError, selection_overrides, validate_overrides

    root = _project_with_params_check(tmp_path / "p")
    overrides = selection_overrides(datasets=["tiny", "b c"], seeds=[1, 2]) + [
        "runs.m1.scale=1e-5", "data.synthetic.gamma=0.25", "+runs.m3.scale=4"]
    assert overrides[:2] == ['datasets=["tiny","b c"]', "seeds=[1,2]"]
    validate_overrides(root / "params.yaml", overrides)
    seen = yaml.safe_load((root / "seen.yaml").read_text())
    assert seen["datasets"] == ["tiny", "b c"] and seen["seeds"] == [1, 2]
    assert seen["runs"] == {"m1": {"scale": 1e-5}, "m2": {"scale": 3.0}, "m3": {"scale": 4}}
    assert seen["data"]["synthetic"]["gamma"] == 0.25 and seen["methods"] == ["m1", "m2"]
    with pytest.raises(ParamsCheckError, match="runs.m1.scale: must be >= 0"):
        validate_overrides(root / "params.yaml", ["runs.m1.scale=-1"])


def test_override_errors_name_the_key(tmp_path):
    from flows.overrides import override_key, selection_overrides, validate_overrides

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    with pytest.raises(ConfigError, match=r"runs\.m3\.scale: override rejected: Could not override 'runs\.m3\.scale'"):
        validate_overrides(params, ["runs.m3.scale=1"])
    with pytest.raises(ConfigError, match="datasets: set twice"):
        validate_overrides(params, selection_overrides(datasets=["tiny"]) + ["datasets=[x]"])
    with pytest.raises(ConfigError, match="seeds: must be a non-empty list"):
        selection_overrides(seeds=[])
    # A mapping value may not bring keys its params.yaml entry lacks (as with `dvc exp run -S`).
    with pytest.raises(ConfigError, match=r"runs\.m1: override rejected: Could not override 'runs\.m1'"):
        validate_overrides(params, ["runs.m1={lr: 1}"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        override_key("runs.m1.scale")
    with pytest.raises(ConfigError, match="override rejected"):
        validate_overrides(params, ["runs.m1.scale=[1"])


def test_output_lines_and_progress_redraws(monkeypatch):
    from flows import dvc_cli

    lines: list[str] = []
    clock = iter([0.0, 1.0, 20.0, 21.0])
    monkeypatch.setattr(dvc_cli.time, "monotonic", lambda: next(clock))
    splitter = dvc_cli._LineSplitter(lines.append, progress_interval=10.0)
    # Progress redraws at t=0 (logged), t=1 (dropped), t=20 (logged); '\r\n' split over chunks.
    for chunk in [b"a\r", b"\nbar 1%\rbar 2%\rbar 3%\r", b"done\n\xc3", b"\xa9 tail"]:
        splitter.feed(chunk)
    splitter.close()
    assert lines == ["a", "bar 1%", "bar 3%", "done", "\u00e9 tail"]


# --- the pipeline flow ---------------------------------------------------------------------


def read_json(path: Path):
    return json.loads(path.read_text())


def flow_logs(flow_run_id) -> str:
    """Every log line of a flow run and its tasks, from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are shipped in batches; send what is pending
    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(log_filter=flt, limit=200, offset=len(messages)):
            messages += [log.message for log in batch]
    return "\n".join(messages)


def run_artifact(flow_run_id, key: str) -> str:
    """The artifact `key` a flow run created, read back from the Prefect server."""
    from prefect.client.orchestration import get_client

    # A raw request: the client's read_artifacts sends null for the filters it omits, which
    # this Prefect server (with FastAPI < 0.155) rejects with 422; omitted keys are accepted.
    body = {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [str(flow_run_id)]}},
            "limit": 10}
    with get_client(sync_client=True) as client:
        artifacts = client.request("POST", "/artifacts/filter", json=body).json()
    assert len(artifacts) == 1, f"flow run {flow_run_id} has {len(artifacts)} artifacts {key!r}"
    return artifacts[0]["data"]


def run_pipeline(root: Path, **kwargs):
    """Run the flow; return its result, its log text and its Markdown artifact."""
    from flows.pipeline import pipeline_flow

    state = pipeline_flow(repo=str(root), return_state=True, **kwargs)
    run_id = state.state_details.flow_run_id
    logs = flow_logs(run_id)
    return state.result(raise_on_failure=True), logs, run_artifact(run_id, "cmkd-pipeline")


ALL_CORE = {"prepare@tiny", "distill@tiny-m1-0", "distill@tiny-m2-0", "evaluate@tiny", "check"}


@pytest.fixture(scope="module")
def core_project(tmp_path_factory, dvc_env):
    return make_project(tmp_path_factory.mktemp("core") / "p", CORE_STAGES)


def test_pipeline_runs_stale_stages_only(core_project, prefect_harness):
    root = core_project
    gamma = PARAMS["data"]["synthetic"]["gamma"]

    first, logs, artifact = run_pipeline(root, jobs=2, retries=0)
    assert set(first["ran"]) == ALL_CORE and first["up_to_date"] == []
    m1, m2 = score(gamma, 2.0, 0), score(gamma, 3.0, 0)
    assert read_json(root / "data/runs/tiny/m1-0.json") == {"score": m1}
    assert read_json(root / "data/reports/tiny/metrics.json")["best_score"] == max(m1, m2)
    assert "PREPARE-LOG dataset=tiny gamma=0.5" in logs  # the stage's own output, streamed
    assert f"| m2 | {m2} |" in artifact  # data/reports/tiny/table.md
    assert "| m2 beats m1 | True |" in artifact  # data/reports/claims.md

    second, _, _ = run_pipeline(root, jobs=2, retries=0)
    assert second["ran"] == [] and set(second["up_to_date"]) == ALL_CORE

    # The user edits one method's parameter: only that branch and what consumes it rerun.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["runs"]["m2"]["scale"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third, _, artifact = run_pipeline(root, jobs=2, retries=0)
    assert set(third["ran"]) == {"distill@tiny-m2-0", "evaluate@tiny", "check"}
    assert set(third["up_to_date"]) == {"prepare@tiny", "distill@tiny-m1-0"}
    assert read_json(root / "data/runs/tiny/m2-0.json") == {"score": score(gamma, 0.5, 0)}
    assert "| m2 beats m1 | False |" in artifact
    assert dvc(root, "status", "--json").strip() == "{}"


def test_pipeline_overrides_become_an_experiment(core_project, prefect_harness):
    root = core_project
    run_pipeline(root, retries=0)  # workspace up to date with its params.yaml
    before = {p: (root / p).read_bytes() for p in
              ("params.yaml", "dvc.lock", "data/runs/tiny/m1-0.json",
               "data/reports/tiny/metrics.json", "claims_summary.json")}
    gamma = PARAMS["data"]["synthetic"]["gamma"]

    result, _, artifact = run_pipeline(root, overrides=["runs.m1.scale=9.0"], experiment_name="m1-scale-9",
                                       retries=0)
    # DVC's record of the experiment (its dvc.lock) differs from the workspace's in that branch only
    assert set(result["ran"]) == {"distill@tiny-m1-0", "evaluate@tiny", "check"}
    assert set(result["up_to_date"]) == {"prepare@tiny", "distill@tiny-m2-0"}
    assert result["experiment"] == "m1-scale-9"
    assert result["overrides"] == ["runs.m1.scale=9.0"]
    # the artifact shows the experiment's own table (read from DVC's cache at its commit)
    assert "`m1-scale-9`" in artifact and f"| m1 | {score(gamma, 9.0, 0)} |" in artifact
    assert "| m2 beats m1 | False |" in artifact
    # The workspace is exactly as before: params, lock, cached and uncached outputs.
    assert {p: (root / p).read_bytes() for p in before} == before
    assert dvc(root, "status", "--json").strip() == "{}"
    # ... and the run is an experiment with its own params and metrics.
    shown = json.loads(dvc(root, "exp", "show", "--json"))
    exps = {rev["name"]: rev["data"] for b in shown for e in (b.get("experiments") or [])
            for rev in e["revs"]}
    data = exps["m1-scale-9"]
    assert data["params"]["params.yaml"]["data"]["runs"]["m1"]["scale"] == 9.0
    metrics = data["metrics"]["data/reports/tiny/metrics.json"]["data"]
    assert metrics["runs"]["m1"]["seed0"] == score(gamma, 9.0, 0)


def test_multi_thread_stages_get_the_cores_to_themselves(tmp_path, dvc_env, prefect_harness):
    """With -j 2 a stage declaring 2 threads (dvc.yaml `meta`) never runs beside another stage
    (OpenMP threads spin-wait: two such stages on 2 cores ran several times slower)."""
    from flows.stage_graph import read_stage_plan

    root = make_project(tmp_path / "p", THREADED_STAGES)
    assert {s.name: s.threads for s in read_stage_plan(root)} == {"wide_a": 2, "wide_b": 2, "narrow": 1}
    result, _, _ = run_pipeline(root, jobs=2, retries=0)
    assert {s["stage"] for s in result["stages"] if s["status"] == "ran"} == set(THREADED_STAGES)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the run's Prefect concurrency limit is gone
        assert not [g.name for g in client.read_global_concurrency_limits(limit=200)
                    if g.name.startswith("cmkd-cores-")]
    spans = {name: tuple(map(float, (root / f"data/{name}.txt").read_text().split())) for name in THREADED_STAGES}
    for wide in ("wide_a", "wide_b"):
        for other, (start, end) in spans.items():
            if other != wide:
                assert end <= spans[wide][0] or start >= spans[wide][1], f"{other} overlapped {wide}: {spans}"


def test_stage_threads_must_be_a_positive_integer(tmp_path, dvc_env):
    from cmkd.errors import CmkdError
    from flows.stage_graph import read_stage_plan

    bad = {"narrow": {**THREADED_STAGES["narrow"], "meta": {"threads": "two"}}}
    root = make_project(tmp_path / "p", bad)
    with pytest.raises(CmkdError, match="dvc.yaml: stage narrow: meta.threads must be a positive integer"):
        read_stage_plan(root)


def test_real_experiment_stages_declare_their_threads():
    """dvc.yaml's `meta.threads` of every experiment stage is the count the stage sets."""
    from stages.experiment import EXPERIMENT_THREADS

    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    experiments = {name: st for name, st in stages.items() if "stages experiment" in str(st.get("cmd", ""))}
    assert len(experiments) == 5
    assert all(st.get("meta", {}).get("threads") == EXPERIMENT_THREADS for st in experiments.values())
    assert all("meta" not in st for name, st in stages.items() if name not in experiments)


def test_pipeline_retries_a_transient_failure(tmp_path, dvc_env, prefect_harness):
    root = make_project(tmp_path / "p", FLAKY_STAGES)
    result, logs, _ = run_pipeline(root, retries=2, retry_backoff_s=0.05)
    flaky = next(s for s in result["stages"] if s["stage"] == "flaky")
    assert flaky["status"] == "ran" and flaky["attempts"] == 2
    assert (root / "data/flaky.txt").read_text() == "ok"
    assert "TRANSIENT: flaky stage lost its connection" in logs


def test_pipeline_failure_carries_the_stage_error(tmp_path, dvc_env, prefect_harness):
    from flows.pipeline import PipelineFailedError, pipeline_flow

    root = make_project(tmp_path / "p", BROKEN_STAGES)
    state = pipeline_flow(repo=str(root), retries=1, retry_backoff_s=0.05, return_state=True)
    assert state.is_failed()
    with pytest.raises(PipelineFailedError) as info:
        state.result()
    assert "FATAL: broken stage cannot open its input" in str(info.value)
    assert info.value.failed.keys() == {"broken"}
    assert info.value.not_run == ["after"]
    assert not (root / "data/after.txt").exists()
    logs = flow_logs(state.state_details.flow_run_id)
    assert logs.count("FATAL: broken stage cannot open its input") >= 2  # both attempts logged
    artifact = run_artifact(state.state_details.flow_run_id, "cmkd-pipeline")
    assert "**The run failed**" in artifact and "| broken | failed |" in artifact


def test_a_second_run_waits_for_the_workspace_lock(tmp_path, dvc_env, prefect_harness, monkeypatch):
    """While another run (`make repro`, a flow) holds the workspace lock, a flow starts nothing."""
    import threading

    from flows import lock

    root = make_project(tmp_path / "p", {"prepare": CORE_STAGES["prepare"]})
    blocked, results = threading.Event(), {}
    owner = lock._owner  # called only when the lock is taken: the flow is waiting for it
    monkeypatch.setattr(lock, "_owner", lambda fd: (blocked.set(), owner(fd))[1])
    with lock.workspace_lock(root):
        flow = threading.Thread(target=lambda: results.update(run=run_pipeline(root, retries=0)[0]))
        flow.start()
        assert blocked.wait(120), "the flow never reached the workspace lock"
        flow.join(1.0)
        assert flow.is_alive() and not (root / "data/prepared/tiny.json").exists()
    flow.join(120)
    assert results["run"]["ran"] == ["prepare@tiny"]


# --- the sweep flow ------------------------------------------------------------------------


def test_sweep_grid_points_and_names(tmp_path):
    from flows.sweep import grid_points, point_name, point_overrides

    points = grid_points(methods=["m1", "m2"], gammas=[0.0, 0.25])
    assert points == [{"method": "m1", "gamma": 0.0}, {"method": "m1", "gamma": 0.25},
                      {"method": "m2", "gamma": 0.0}, {"method": "m2", "gamma": 0.25}]
    assert point_name("s", points[1]) == "s-m1-g0_25"
    assert point_name("s", {"dataset": "tiny", "method": "m1", "seed": 3, "gamma": 1.0}) == \
        "s-tiny-m1-s3-g1_0"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    assert point_overrides(params, points[1], "data.synthetic.gamma", ["runs.m2.scale=4"]) == [
        'methods=["m1"]', "data.synthetic.gamma=0.25", "runs.m2.scale=4"]
    with pytest.raises(ConfigError, match="data.synthetic.gamma: set twice"):
        point_overrides(params, points[1], "data.synthetic.gamma", ["data.synthetic.gamma=1"])
    with pytest.raises(ConfigError, match="seeds: repeated values"):
        grid_points(seeds=[1, 1])
    with pytest.raises(ConfigError, match="give at least one"):
        grid_points()


def test_sweep_metric_columns():
    from flows.sweep import metric_columns

    # The lead pipeline's metrics.json shape: rows.<run>.<metric>.{mean,std,values,n}.
    report = {"task": "classification", "metric": "f1_weighted",
              "rows": {"kdv1": {"method": "kd", "f1_weighted": {"mean": 0.5, "values": [0.5]}},
                       "student": {"f1_weighted": {"mean": 0.25}}}}
    assert metric_columns({"data/reports/a/metrics.json": report}, method="kdv1") == {
        "rows.<method>.f1_weighted.mean": 0.5, "rows.student.f1_weighted.mean": 0.25}
    both = metric_columns({"a.json": {"x": 1, "y": True}, "b.json": {"x": 2.5}})
    assert both == {"a.json:x": 1, "b.json:x": 2.5}


@pytest.fixture(scope="module")
def sweep_project(tmp_path_factory, dvc_env):
    return make_project(tmp_path_factory.mktemp("sweep") / "p", CORE_STAGES)


def exp_names(root: Path) -> set[str]:
    shown = json.loads(dvc(root, "exp", "show", "--json"))
    return {rev["name"] for b in shown for e in (b.get("experiments") or []) for rev in e["revs"]}


def test_sweep_grid_on_two_threads(sweep_project, prefect_harness):
    from flows.sweep import sweep_flow

    root = sweep_project
    before = (root / "params.yaml").read_bytes()
    result = sweep_flow(repo=str(root), methods=["m1", "m2"], seeds=[0, 1], jobs=2,
                        retries=0, sweep_name="t")
    gamma, scales = PARAMS["data"]["synthetic"]["gamma"], {"m1": 2.0, "m2": 3.0}
    expected = {(m, s): score(gamma, scales[m], s) for m in scales for s in (0, 1)}
    got = {(r["method"], r["seed"]): r["best_score"] for r in result["rows"]}
    assert got == expected
    assert all(r["status"] == "done" for r in result["rows"])
    names = {r["experiment"] for r in result["rows"]}
    assert names == {"t-m1-s0", "t-m1-s1", "t-m2-s0", "t-m2-s1"} and names <= exp_names(root)
    # results.csv / results.md: DVC's `dvc exp show` tables, this sweep's experiments only
    import csv

    table = list(csv.DictReader((root / "data/sweeps/t/results.csv").read_text().splitlines()))
    assert {r["Experiment"]: float(r["best_score"]) for r in table} == {
        f"t-{m}-s{s}": v for (m, s), v in expected.items()}
    assert not any(name.endswith(".py") for name in table[0])  # dependency hashes dropped
    md = (root / "data/sweeps/t/results.md").read_text().splitlines()
    assert md[0].startswith("| Experiment") and len(md) == 2 + 4 and all("[t-" in line for line in md[2:])
    assert (root / "params.yaml").read_bytes() == before  # the workspace is never edited


def test_sweep_grid_on_a_dask_cluster(sweep_project, prefect_harness):
    from distributed import LocalCluster

    from flows.sweep import sweep_flow

    root = sweep_project
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        # The grid of the thread test (if it ran first, DVC's run cache serves every stage):
        # what is tested here is the Dask path, not the stages again.
        result = sweep_flow(repo=str(root), methods=["m1", "m2"], seeds=[0, 1],
                            dask_address=cluster.scheduler_address, retries=0, sweep_name="d")
        # The experiments were Dask tasks (the scheduler saw the Prefect task's key prefix).
        assert any("experiment" in prefix for prefix in cluster.scheduler.task_prefixes)
    gamma, scales = PARAMS["data"]["synthetic"]["gamma"], {"m1": 2.0, "m2": 3.0}
    expected = {(m, s): score(gamma, scales[m], s) for m in scales for s in (0, 1)}
    assert {(r["method"], r["seed"]): r["best_score"] for r in result["rows"]} == expected
    assert {r["experiment"] for r in result["rows"]} == {"d-m1-s0", "d-m1-s1", "d-m2-s0", "d-m2-s1"}
    assert {r["experiment"] for r in result["rows"]} <= exp_names(root)


# --- deployment and command lines --------------------------------------------------------


def test_nightly_deployment_schedule():
    from flows.deploy import ENTRYPOINT, NIGHTLY_CRON, nightly_deployment

    assert NIGHTLY_CRON == "0 3 * * *"
    served = nightly_deployment(repo="/some/checkout")
    assert served.name == "nightly-claims"
    [schedule] = served.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
    assert served.parameters["repo"] == "/some/checkout" and served.parameters["force"] is False
    assert served.work_pool_name is None
    pooled = nightly_deployment(cron="30 1 * * 1-5", timezone="Europe/Berlin", work_pool="cmkd",
                                force=True)
    assert pooled.work_pool_name == "cmkd" and pooled.entrypoint == ENTRYPOINT
    assert pooled.schedules[0].schedule.cron == "30 1 * * 1-5"
    assert pooled.schedules[0].schedule.timezone == "Europe/Berlin"
    assert pooled.parameters["force"] is True
    # A worker runs the flow from this checkout.
    step = pooled.storage.to_pull_step()["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == str(Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.sweep", "flows.deploy"])
def test_command_line_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    assert f"usage: python -m {module}" in capsys.readouterr().out


def test_command_lines_parse_and_reject_bad_config(tmp_path, capsys):
    from flows import deploy, pipeline, sweep

    args = pipeline.build_parser().parse_args(
        ["--datasets", "synthetic", "--set", "runs.kdv1.temperature=2", "-j", "2"])
    assert (args.datasets, args.sets, args.jobs) == (["synthetic"], ["runs.kdv1.temperature=2"], 2)
    args = sweep.build_parser().parse_args(["--gammas", "0", "0.5", "--dask-address", "tcp://h:1"])
    assert (args.gammas, args.dask_address) == ([0.0, 0.5], "tcp://h:1")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    # Bad keys fail before any flow run starts (no Prefect server is needed for this).
    assert pipeline.main(["--repo", str(tmp_path), "--set", "runs.m9.scale=1"]) == 1
    assert "runs.m9.scale: override rejected" in capsys.readouterr().err
    assert sweep.main(["--repo", str(tmp_path), "--seeds", "0", "--set", "nope=1"]) == 1
    assert "nope: override rejected" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        deploy.main(["--deploy"])  # needs --work-pool
    assert "--deploy needs --work-pool" in capsys.readouterr().err


# --- the real pipeline ---------------------------------------------------------------------


def shrink_experiments(params: dict) -> None:
    """The papers' synthetic experiments, cut to one seed, two sweep points and a few epochs;
    the claims are checked, and a changed verdict does not fail the check stage (this tests the
    flow, not the science)."""
    for exp in params.get("experiments", {}).values():
        if isinstance(exp.get("seeds"), int):
            exp["seeds"] = 1
        for net in exp.get("nets", {}).values():
            net["train"]["epochs"] = min(net["train"]["epochs"], 20)
        if "algorithm1" in exp:
            exp["algorithm1"].update(n_repeats=2, pair_epochs=20)
        for mask in (exp.get("masks") or {}).values():  # the NTDH feature mask's Algorithm 1
            if "pair_epochs" in mask:
                mask.update(n_repeats=2, pair_epochs=2)
        for key, values in exp.get("sweep", {}).items():
            exp["sweep"][key] = [values[0], values[-1]]
        if isinstance(exp.get("noise_std"), list):
            exp["noise_std"] = [exp["noise_std"][0], exp["noise_std"][-1]]


@pytest.mark.slow
def test_pipeline_flow_on_the_real_pipeline(tmp_path, prefect_harness, monkeypatch):
    """The flow over a copy of this repository's own pipeline, tiny configuration."""
    from tests.conftest import copy_pipeline, tiny_params, tool_env

    env = tool_env(tmp_path)
    for key in ("HOME", "DVC_NO_ANALYTICS", "DVC_SITE_CACHE_DIR", "PYTHONPATH", "CMKD_LOG_LEVEL"):
        monkeypatch.setenv(key, env[key])
    repo = copy_pipeline(tmp_path / "repo")
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), methods=("kdv1", "kdv2"))
    shrink_experiments(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "cmkd tests")
    git(repo, "config", "user.email", "tests@cmkd.invalid")
    dvc(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pipeline copy")

    first, logs, artifact = run_pipeline(repo, jobs=2, retries=0)
    core = {"download@synthetic", "prepare@synthetic", "train_teacher@synthetic",
            "train_student@synthetic", "distill@synthetic-kdv1", "distill@synthetic-kdv2",
            "evaluate@synthetic"}
    assert core <= set(first["ran"]) and first["up_to_date"] == []
    report = read_json(repo / "data/reports/synthetic/metrics.json")
    assert {"teacher", "student", "kdv1", "kdv2"} <= set(report["rows"])
    assert "| kdv2 |" in artifact and "| TEACHER |" in artifact

    second, _, _ = run_pipeline(repo, retries=0)
    # only `resolve` reruns: DVC runs an always_changed stage every time (it fingerprints own data)
    assert set(second["ran"]) <= ALWAYS_CHANGED
    assert set(second["up_to_date"]) == set(first["ran"]) - ALWAYS_CHANGED

    before = (repo / "data/reports/synthetic/metrics.json").read_bytes()
    third, _, _ = run_pipeline(repo, overrides=["runs.kdv1.temperature=2.0"],
                               experiment_name="kdv1-t2", retries=0)
    assert {"distill@synthetic-kdv1", "evaluate@synthetic"} <= set(third["ran"])
    assert not {"train_teacher@synthetic", "distill@synthetic-kdv2"} & set(third["ran"])
    assert (repo / "data/reports/synthetic/metrics.json").read_bytes() == before
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    exps = {rev["name"]: rev["data"] for b in shown for e in (b.get("experiments") or [])
            for rev in e["revs"]}
    # the small metrics files git keeps (metrics/<dataset>/<row>.json), one per row
    metrics = exps["kdv1-t2"]["metrics"]
    assert {"metrics/synthetic/kdv1.json", "metrics/synthetic/kdv2.json"} <= set(metrics)
    # The untouched branch has the same numbers (rounded to 4 decimals there).
    kdv2 = report["rows"]["kdv2"]["f1_weighted"]
    assert metrics["metrics/synthetic/kdv2.json"]["data"]["f1_weighted"] == round(kdv2["mean"], 4)
