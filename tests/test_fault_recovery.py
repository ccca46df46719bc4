"""Faults: killed runs, corrupt state, temporaries of dead processes, permissions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from cmkd.data.datasets.synthetic import ntdh_sklearn
from cmkd.errors import DataFormatError
from cmkd.methods import build_distiller
from cmkd.models import build_model
from cmkd.training.config import TrainConfig
from cmkd.training.data import SplitData
from cmkd.training.distributed import seed_everything
from cmkd.training.logit_cache import cache_logits, verify_logits
from cmkd.training.loop import fit
from cmkd.utils.atomic import atomic_dir, atomic_path, owner_pid, remove_stale, remove_stale_tree
from tests.conftest import REPO, copy_pipeline, tiny_params, tool_env


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- temporaries


def test_temporaries_honour_the_umask_and_live_in_the_scratch_folder(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out" / "a.json") as tmp:
            assert owner_pid(tmp.name) == os.getpid()
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "runs" / "teacher", scratch=tmp_path / "scratch") as folder:
            assert folder.parent == tmp_path / "scratch" and owner_pid(folder.name) == os.getpid()
            assert list((tmp_path / "runs").iterdir()) == []  # nothing inside the target's parent meanwhile
            (folder / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "runs" / "teacher").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == []


def test_the_next_writer_removes_temporaries_of_dead_processes_only(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".teacher.{dead}-abc123.tmp").mkdir()
    (tmp_path / f".teacher.{dead}-abc123.tmp" / "f").write_text("x")
    (tmp_path / f".x.h5.{dead}.tmp").write_text("x")
    (tmp_path / f".teacher.{os.getppid()}-zzz.tmp").mkdir()  # a live owner: kept
    (tmp_path / "teacher.123.tmp").write_text("not ours")  # not a hidden temporary of ours: kept
    removed = remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".teacher.{dead}-abc123.tmp", f".x.h5.{dead}.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".teacher.{os.getppid()}-zzz.tmp", "teacher.123.tmp"])
    # atomic_dir does it by itself for its own name
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / f".run.{dead}-q.tmp").mkdir()
    with atomic_dir(tmp_path / "run", scratch=tmp_path / "s"):
        pass
    assert list((tmp_path / "s").iterdir()) == []


def test_the_tree_sweep_reaches_nested_folders_but_not_inside_shallow_or_live_ones(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    nested = tmp_path / "runs" / "digits"
    nested.mkdir(parents=True)
    (nested / f".metrics.json.{dead}-a1.tmp").write_text("x")  # beside a restored output
    (tmp_path / f".method_code.{dead}-b2.tmp").mkdir()
    (tmp_path / f".method_code.{dead}-b2.tmp" / "f.json").write_text("x")
    keep_live = tmp_path / f".teacher.{live}-c3.tmp"
    keep_live.mkdir()
    (keep_live / f".inner.{dead}-d4.tmp").write_text("a live writer's folder is its business")
    raw = tmp_path / "raw"
    (raw / "kitti" / "deep").mkdir(parents=True)
    (raw / f".kitti.{dead}-e5.tmp").mkdir()  # the shallow folder's own level is searched
    (raw / "kitti" / "deep" / f".user.{dead}-f6.tmp").write_text("a user's dataset: never walked")
    (nested / "plain.tmp").write_text("not ours")
    removed = remove_stale_tree(tmp_path, shallow=(raw,))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == sorted([
        f".method_code.{dead}-b2.tmp", f"runs/digits/.metrics.json.{dead}-a1.tmp", f"raw/.kitti.{dead}-e5.tmp"])
    assert (keep_live / f".inner.{dead}-d4.tmp").exists()
    assert (raw / "kitti" / "deep" / f".user.{dead}-f6.tmp").exists()
    assert (nested / "plain.tmp").exists()


def test_a_temporary_that_cannot_be_removed_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch, caplog):
    dead = _dead_pid()
    (tmp_path / f".a.{dead}-x.tmp").write_text("x")
    (tmp_path / f".b.{dead}-y.tmp").write_text("x")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):  # as root, permissions cannot make it fail for real
        if os.path.basename(path).startswith(".a."):
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="cmkd.utils.atomic"):
        removed = remove_stale(tmp_path)
    assert [p.name for p in removed] == [f".b.{dead}-y.tmp"]
    assert (tmp_path / f".a.{dead}-x.tmp").exists() and f".a.{dead}-x.tmp" in caplog.text
    assert "Permission denied" in caplog.text


def test_every_stage_sweeps_killed_runs_temporaries_before_it_runs(tmp_path):
    # A SIGKILLed stage whose output DVC later restores from its run cache is never written
    # again, so no writer of its name would remove what it left: the next stage does.
    repo = copy_pipeline(tmp_path / "repo")
    dead, live = _dead_pid(), os.getppid()
    planted = {
        "dead": [f"data/.tmp/.teacher.{dead}-x1.tmp/", f"data/runs/synthetic/.kdv1.{dead}-old.tmp/",
                 f"data/reports/synthetic/.table.md.{dead}-x2.tmp", f"data/prepared/.synthetic.h5.{dead}.tmp",
                 f"metrics/.synthetic.{dead}-x3.tmp/", f".README.md.{dead}-x4.tmp"],
        "kept": [f"data/.tmp/.kdv1.{live}-y1.tmp/", f"data/raw/sunrgbd/SUNRGBD/.a.{dead}-y2.tmp",
                 "data/runs/synthetic/kdv1/metrics.json"],
    }
    for rel in planted["dead"] + planted["kept"]:
        path = repo / rel.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            path.mkdir()
            (path / "f").write_text("x")
        else:
            path.write_text("x")
    env = {**tool_env(tmp_path), "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-m", "stages", "method_code"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [rel for rel in planted["dead"] if (repo / rel.rstrip("/")).exists()] == []
    assert [rel for rel in planted["kept"] if not (repo / rel.rstrip("/")).exists()] == []
    assert f"removed {len(planted['dead'])} temporaries of killed runs" in out.stderr


# --------------------------------------------------------------------------- corrupt state


def _data():
    t, s, y = ntdh_sklearn(n_samples=300, n_features=8, n_classes=3, gamma=0.5, seed=0)
    return (SplitData.from_arrays(teacher_input=t[:240], student_input=s[:240], target=y[:240]),
            SplitData.from_arrays(teacher_input=t[240:], student_input=s[240:], target=y[240:]))


def _fit(ckpt_dir: Path, epochs: int = 3):
    train, val = _data()
    seed_everything(0)
    model = build_model({"arch": "mlp", "hidden": [16]}, (8,), 3)
    distiller = build_distiller({"method": "supervised"}, student=model, teacher=None, num_classes=3)
    return fit(distiller, train, val, TrainConfig(epochs=epochs, batch_size=64), task="classification", num_classes=3,
               progress=False, checkpoint_dir=ckpt_dir, fingerprint="fp"), model


def test_a_truncated_checkpoint_is_set_aside_with_a_warning_and_training_restarts(tmp_path, caplog):
    reference, ref_model = _fit(tmp_path / "ref")
    ckpt = tmp_path / "ckpt" / "last.pt"
    _fit(ckpt.parent, epochs=2)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="cmkd.training.checkpoint"):
        result, model = _fit(ckpt.parent)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and str(ckpt) in warning[0] and "restarts" in warning[0]
    assert result.resumed_from_epoch is None and result.history == reference.history
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    aside = list(ckpt.parent.glob("last.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == data[: len(data) // 2]
    # The good checkpoint written by this run resumes as before (a retry does not warn again).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmkd.training.checkpoint"):
        again, _ = _fit(ckpt.parent, epochs=4)
    assert again.resumed_from_epoch == 3 and not [r for r in caplog.records if r.levelno == logging.WARNING]


def _logits_file(tmp_path: Path) -> tuple[Path, SplitData]:
    train, _ = _data()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    path = tmp_path / "train_logits.h5"
    cache_logits(model, train, "teacher_input", path, batch_size=50)
    return path, train


def test_cached_logits_carry_a_checksum_and_a_corrupt_cache_is_an_error_naming_it(tmp_path):
    path, train = _logits_file(tmp_path)
    assert verify_logits(path) == len(train)
    attached = train.with_teacher_logits(path)
    assert "teacher_logits" in attached.keys
    good = path.read_bytes()

    # Class columns swapped in place: same size, still a valid HDF5 file.
    with h5py.File(path, "r+") as f:
        f["logits"][:] = f["logits"][()][:, [1, 0, 2]]
    with pytest.raises(DataFormatError, match="do not match their checksum") as err:
        train.with_teacher_logits(path)
    assert str(path) in str(err.value)

    path.write_bytes(good[: len(good) // 2])  # truncated copy
    with pytest.raises(DataFormatError, match="unreadable") as err:
        train.with_teacher_logits(path)
    assert str(path) in str(err.value)

    path.write_bytes(good)
    with h5py.File(path, "r+") as f:
        del f["logits"].attrs["sha256"]
    with pytest.raises(DataFormatError, match="no checksum"):
        verify_logits(path)


# --------------------------------------------------------------------------- killed and resumed


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_teacher_killed_after_3_of_8_epochs_resumes_to_byte_identical_outputs(tmp_path):
    env = {**tool_env(tmp_path), "CMKD_SEED_WORKERS": "1"}
    trees = {}
    for name in ("straight", "killed"):
        repo = copy_pipeline(tmp_path / name)
        params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), epochs=8)
        params["data"]["synthetic"]["n_samples"] = 12000
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in ("download", "prepare"):
            assert subprocess.run([sys.executable, "-m", "stages", stage, "--dataset", "synthetic"], cwd=repo,
                                  env=env).returncode == 0
        cmd = [sys.executable, "-m", "stages", "train", "--dataset", "synthetic", "--role", "teacher", "--no-progress"]
        if name == "killed":
            ckpt = repo / "data/checkpoints/synthetic/teacher/seed0/last.pt"
            proc = subprocess.Popen(cmd, cwd=repo, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
            epoch, deadline = -1, time.time() + 120
            while epoch < 2 and time.time() < deadline:
                try:
                    epoch = torch.load(ckpt, weights_only=True)["epoch"]
                except Exception:
                    time.sleep(0.01)  # not written yet, or being replaced right now
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = torch.load(ckpt, weights_only=True)["epoch"]
            assert 2 <= killed_at < 7, f"killed after epoch {killed_at}: the test proves nothing"
            # What the dead run left is outside every stage's dependencies.
            assert sorted(p.name for p in (repo / "data/runs/synthetic").iterdir()) == []
            assert [owner_pid(p.name) for p in (repo / "data/.tmp").iterdir()] == [proc.pid]
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        if name == "killed":
            assert list((repo / "data/.tmp").iterdir()) == []  # the dead run's folder was removed
        assert sorted(p.name for p in (repo / "data/runs/synthetic").iterdir()) == ["teacher"]
        trees[name] = _tree(repo / "data/runs/synthetic/teacher")
        steps = (repo / "data/runs/synthetic/teacher/seed0/live/plots/metrics/val/f1_weighted.tsv"
                 ).read_text().split("\n")
        assert [line.split("\t")[0] for line in steps[1:] if line] == [str(i) for i in range(8)]
    assert trees["killed"] == trees["straight"]


# --------------------------------------------------------------------------- kill -9 during prepare

_PAUSED_PREPARE = """
import sys, time
from pathlib import Path
from cmkd.data.samples import semantickitti as kitti_sample
from cmkd.data.h5 import PreparedWriter

def paused(self, split, arrays, root=""):  # a stage killed while it writes the HDF5 file
    print("WRITING", flush=True)
    time.sleep(600)

PreparedWriter.append = paused
cfg = {**kitti_sample.DEFAULTS, **__import__("json").loads(sys.argv[3])}
kitti_sample.prepare(cfg, Path(sys.argv[1]), Path(sys.argv[2]), progress=False)
"""


def _session_alive(sid: int) -> list[int]:
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[3]) == sid and stat[0] not in ("Z", "X"):  # field 6 of /proc/pid/stat: session
            alive.append(int(proc.name))
    return alive


def _ours_in_dev_shm(pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith((f"cmkd-{pid}-", f"sem.cmkd-{pid}-")))


@pytest.mark.skipif(sys.platform != "linux", reason="/dev/shm, process sessions: Linux")
def test_kill_9_of_a_preparing_stage_leaves_no_process_and_the_next_run_removes_its_segments(tmp_path):
    from cmkd.data.samples import semantickitti as kitti_sample

    tiny = {"seed": 3, "sequences": [{"sequence": 0, "frames": 3, "image_size": [1241, 376]},
                                     {"sequence": 8, "frames": 1, "image_size": [1226, 370]}],
            "image_scale": 0.2, "lidar_width": 256, "split": {"train": [0], "val": [8]},
            "crop": {"train": [32, 96], "val": [32, 96]}, "workers": 2}
    raw = tmp_path / "raw"
    kitti_sample.download(tiny, raw, progress=False)
    out = tmp_path / "prepared" / "x.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_PREPARE, str(raw), str(out), json.dumps(tiny)],
                            env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "WRITING"
    assert len(_session_alive(proc.pid)) >= 3  # the stage, its forkserver / resource tracker, workers
    assert _ours_in_dev_shm(proc.pid), "the stage has no shared memory: the test proves nothing"
    assert [p.name for p in out.parent.iterdir()] == [f".x.h5.{proc.pid}.tmp"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert _session_alive(proc.pid) == []  # no forkserver, worker or resource tracker survives
    assert _ours_in_dev_shm(proc.pid)  # what SIGKILL cannot clean up ...

    kitti_sample.prepare({**kitti_sample.DEFAULTS, **tiny}, raw, out, progress=False)
    assert _ours_in_dev_shm(proc.pid) == []  # ... the next run removes
    assert [p.name for p in out.parent.iterdir()] == ["x.h5"]
    assert _ours_in_dev_shm(os.getpid()) == []


# --------------------------------------------------------------------------- concurrent repro


_SLOW_STAGE_DVC_YAML = """
stages:
  slow:
    cmd: python -c "import time; open('started', 'a').write('x'); time.sleep(4); open('out.txt', 'w').write('done')"
    outs:
      - out.txt
"""


@pytest.mark.skipif(sys.platform != "linux", reason="flock")
def test_a_second_repro_in_the_workspace_waits_and_both_succeed(tmp_path):
    env = tool_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    repo = tmp_path / "ws"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    assert subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, env=env).returncode == 0
    (repo / "dvc.yaml").write_text(_SLOW_STAGE_DVC_YAML)
    # What `make repro` runs (checked against the Makefile below), twice at once.
    cmd = [sys.executable, "-m", "flows.lock", *dvc, "repro"]
    first = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (repo / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out1, out2 = first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]
    assert first.returncode == 0, out1
    assert second.returncode == 0, out2
    assert "waiting for the run in this workspace" in out2
    assert (repo / "out.txt").read_text() == "done"
    assert (repo / "started").read_text() == "x"  # the second found the stage up to date
    makefile = (REPO / "Makefile").read_text()
    assert "$(BIN)/python -m flows.lock $(BIN)/dvc repro" in makefile
