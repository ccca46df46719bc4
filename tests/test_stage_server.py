"""The stage server (stages/_server.py): same results as a plain process, fresh code every
time, exit statuses and signals as a process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_pipeline, tiny_params, tool_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the stage server is Linux only")


def _env(tmp_path: Path, server_dir: Path, **extra: str) -> dict[str, str]:
    server_dir.mkdir(mode=0o700, exist_ok=True)
    return {**tool_env(tmp_path), "CMKD_STAGE_SERVER": "1", "CMKD_STAGE_SERVER_DIR": str(server_dir),
            "CMKD_LOG_LEVEL": "DEBUG", **extra}


def _stage(repo: Path, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=repo, env=env, capture_output=True, text=True, **kw)


def _wait_for_server(server_dir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(server_dir.glob("*.sock")):
            return
        time.sleep(0.1)
    raise AssertionError("no stage server started")


def _stop(server_dir: Path) -> None:
    for sock in server_dir.glob("*.sock"):
        sock.unlink()


def _repo(path: Path, **params_kw) -> Path:
    repo = copy_pipeline(path)
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), **params_kw)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    return repo


def test_stage_in_the_server_gives_the_direct_run_and_reads_edited_code(tmp_path):
    server_dir = tmp_path / "server"
    env = _env(tmp_path, server_dir)
    try:
        served, direct = _repo(tmp_path / "served", seeds=(0, 1)), _repo(tmp_path / "direct", seeds=(0, 1))
        first = _stage(served, env, "download", "--dataset", "synthetic")
        assert first.returncode == 0, first.stderr
        assert "stage server" not in first.stderr  # the first stage runs itself and starts the server
        _wait_for_server(server_dir)
        for args in (("prepare", "--dataset", "synthetic"), ("train", "--dataset", "synthetic", "--role", "teacher", "--no-progress")):
            out = _stage(served, env, *args)
            assert out.returncode == 0, out.stderr
            assert "runs in the stage server" in out.stderr
        plain = {**env, "CMKD_STAGE_SERVER": "0"}
        for args in (("download", "--dataset", "synthetic"), ("prepare", "--dataset", "synthetic"),
                     ("train", "--dataset", "synthetic", "--role", "teacher", "--no-progress")):
            out = _stage(direct, plain, *args)
            assert out.returncode == 0 and "stage server" not in out.stderr, out.stderr
        metrics = "data/runs/synthetic/teacher/metrics.json"
        assert json.loads((served / metrics).read_text()) == json.loads((direct / metrics).read_text())

        # Another checkout with edited stage code: the server's child runs that code, not the first one's.
        edited = _repo(tmp_path / "edited")
        download = edited / "stages" / "download.py"
        download.write_text('import sys\nprint("EDITED-CHECKOUT", file=sys.stderr)\n' + download.read_text())
        out = _stage(edited, env, "download", "--dataset", "synthetic")
        assert out.returncode == 0 and "runs in the stage server" in out.stderr and "EDITED-CHECKOUT" in out.stderr
        out = _stage(served, env, "download", "--dataset", "synthetic")
        assert out.returncode == 0 and "EDITED-CHECKOUT" not in out.stderr

        # A stage's own error: its message and exit status 2 come back through the server.
        params = yaml.safe_load((served / "params.yaml").read_text())
        params["methods"] = ["no_such_method"]
        (served / "params.yaml").write_text(yaml.safe_dump(params))
        out = _stage(served, env, "evaluate", "--dataset", "synthetic")
        assert out.returncode == 2 and "runs in the stage server" in out.stderr
        assert "no_such_method" in out.stderr

        # A stopped server leaves nothing behind in its folder (no socket, no start lock).
        _stop(server_dir)
        deadline = time.time() + 10
        while list(server_dir.iterdir()) and time.time() < deadline:
            time.sleep(0.1)
        assert list(server_dir.iterdir()) == []
    finally:
        _stop(server_dir)


def _started_child(proc: subprocess.Popen) -> int:
    line = proc.stderr.readline()
    assert "runs in the stage server as pid" in line, line
    return int(line.split()[-1])


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_signals_reach_the_stage_and_a_killed_client_takes_its_stage_along(tmp_path):
    server_dir = tmp_path / "server"
    env = _env(tmp_path, server_dir, CMKD_SEED_WORKERS="1")
    repo = _repo(tmp_path / "repo", epochs=400)
    try:
        assert _stage(repo, env, "download", "--dataset", "synthetic").returncode == 0
        _wait_for_server(server_dir)
        assert _stage(repo, env, "prepare", "--dataset", "synthetic").returncode == 0
        cmd = [sys.executable, "-m", "stages", "train", "--dataset", "synthetic", "--role", "teacher", "--no-progress"]

        # SIGTERM to the client is forwarded; the stage dies of it and the client says so (128 + 15).
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
        child = _started_child(proc)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert _gone(child)

        # SIGKILL of the client (nothing can be forwarded): the stage notices and ends too.
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
        child = _started_child(proc)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _gone(child), "the stage outlived its killed client"
        assert not (repo / "data/runs/synthetic/teacher").exists()  # nothing half-written
    finally:
        _stop(server_dir)


def test_the_server_is_off_by_default(tmp_path):
    server_dir = tmp_path / "server"
    env = _env(tmp_path, server_dir)
    del env["CMKD_STAGE_SERVER"]
    repo = _repo(tmp_path / "repo")
    for _ in range(2):
        out = _stage(repo, env, "download", "--dataset", "synthetic")
        assert out.returncode == 0 and "stage server" not in out.stderr, out.stderr
    time.sleep(1.0)
    assert list(server_dir.iterdir()) == []  # no server started, no socket, no lock file


def test_the_socket_key_follows_library_files_and_the_server_detects_edits(tmp_path, monkeypatch):
    from stages import _server

    pkg = tmp_path / "lib" / "fakelib_cmkd"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VERSION = 1\n")
    (pkg / "sub.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.setattr(_server, "PRELOAD", ("fakelib_cmkd.sub",))
    before = _server.socket_path()
    assert before == _server.socket_path()  # stable while nothing changes
    # A reinstall (pip removes the old files, writes new ones) changes the key: a new server.
    (pkg / "__init__.py").unlink()
    time.sleep(0.01)
    (pkg / "__init__.py").write_text("VERSION = 2\n")
    assert _server.socket_path() != before

    # In the server: every module file it holds is re-checked before a fork.
    import importlib

    importlib.import_module("fakelib_cmkd.sub")
    loaded = _server._loaded_files()
    assert _server._changed(loaded) is None
    time.sleep(0.01)
    (pkg / "sub.py").write_text("X = 2  # upgraded\n")
    assert _server._changed(loaded) == str(pkg / "sub.py")
    sys.modules.pop("fakelib_cmkd.sub", None)
    sys.modules.pop("fakelib_cmkd", None)
