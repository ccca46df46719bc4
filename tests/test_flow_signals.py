"""SIGTERM ends a running pipeline flow within seconds and leaves no stage process behind."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tests.conftest import REPO, dvc, tool_env

MARKER = "cmkd-sigterm-test-sleeper"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_sigterm_ends_the_flow_and_its_stage_within_seconds(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = tool_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)  # the flows package of this checkout
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a busy machine
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    sleeper = f"import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(600)  # {MARKER}"
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sleep": {"cmd": f'python -c "{sleeper}"',
                                                                          "outs": ["done"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    dvc(["init", "-q"], repo, env)
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--repo", str(repo), "--retries", "2"],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 420  # a temporary Prefect server starts first
        while not (repo / "pid").exists() or not (repo / "pid").read_text():
            assert flow.poll() is None, flow.stderr.read()
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.5)
        stage_pid = int((repo / "pid").read_text())
        assert _alive(stage_pid)
        flow.send_signal(signal.SIGTERM)
        start = time.monotonic()
        flow.wait(timeout=30)
        took = time.monotonic() - start
        assert took < 10, f"the flow took {took:.1f} s to exit after SIGTERM"
        time.sleep(0.5)
        assert not _alive(stage_pid), "the stage survived the flow"
        left = [p for p in psutil.process_iter(["cmdline"]) if MARKER in " ".join(p.info["cmdline"] or [])
                and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, left
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait()
        if (repo / "pid").exists() and (repo / "pid").read_text():
            try:
                os.kill(int((repo / "pid").read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
