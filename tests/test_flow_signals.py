"""SIGTERM ends a running pipeline flow within seconds and leaves no stage process, and no
temporary Prefect server, behind."""

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


def _is_prefect_server(proc: psutil.Process) -> bool:
    """The temporary server Prefect starts: `python -m uvicorn ... prefect.server.api.server:create_app`."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "uvicorn" in cmdline and "prefect.server.api.server:create_app" in cmdline


def _still_running(proc: psutil.Process) -> bool:
    try:  # is_running() also compares the start time, so a reused pid is not mistaken for it
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
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
    children: list[psutil.Process] = []
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
        # Every process the flow started (its temporary Prefect server, DVC, the stage), recorded
        # before SIGTERM: they are re-parented once the flow exits.
        children = psutil.Process(flow.pid).children(recursive=True)
        servers = [p for p in children if _is_prefect_server(p)]
        assert servers, f"no temporary Prefect server among the flow's children: {children}"
        flow.send_signal(signal.SIGTERM)
        start = time.monotonic()
        flow.wait(timeout=30)
        took = time.monotonic() - start
        assert took < 10, f"the flow took {took:.1f} s to exit after SIGTERM"
        assert flow.returncode == -signal.SIGTERM, f"exit status {flow.returncode}, not killed by SIGTERM"
        time.sleep(0.5)
        assert not _alive(stage_pid), "the stage survived the flow"
        left = [p for p in psutil.process_iter(["cmdline"]) if MARKER in " ".join(p.info["cmdline"] or [])
                and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, left
        deadline = time.monotonic() + 5
        while any(map(_still_running, children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in servers if _still_running(p)], "the temporary Prefect server survived the flow"
        assert not [p for p in children if _still_running(p)], "a process started by the flow survived it"
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait()
        for proc in children:  # a failed run leaves nothing running either
            if _still_running(proc):
                proc.kill()
        if (repo / "pid").exists() and (repo / "pid").read_text():
            try:
                os.kill(int((repo / "pid").read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
