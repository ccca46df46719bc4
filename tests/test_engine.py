import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmkd.data.augment import augment_batch
from cmkd.data.datasets.synthetic import ntdh_sklearn
from cmkd.data.h5 import PreparedWriter, read_attrs
from cmkd.methods import build_distiller
from cmkd.models import build_model
from cmkd.training.config import TrainConfig
from cmkd.training.data import SplitData, load_split
from cmkd.training.distributed import seed_everything
from cmkd.training.loop import fit
from tests.conftest import REPO, copy_pipeline, tiny_params, tool_env


def _data():
    t, s, y = ntdh_sklearn(n_samples=500, n_features=8, n_classes=3, gamma=0.5, seed=0)
    return (SplitData.from_arrays(teacher_input=t[:400], student_input=s[:400], target=y[:400]),
            SplitData.from_arrays(teacher_input=t[400:], student_input=s[400:], target=y[400:]))


def _train_once(seed=0, epochs=4):
    train, val = _data()
    seed_everything(seed)
    model = build_model({"arch": "mlp", "hidden": [32], "dropout": 0.2}, (8,), 3)
    distiller = build_distiller({"method": "supervised"}, student=model, teacher=None, num_classes=3)
    result = fit(distiller, train, val, TrainConfig(epochs=epochs, batch_size=64, seed=seed),
                 task="classification", num_classes=3, progress=False)
    return result, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seed_same_result_and_other_seed_differs():
    r1, p1 = _train_once(0)
    r2, p2 = _train_once(0)
    r3, p3 = _train_once(1)
    assert torch.equal(p1, p2) and r1.history == r2.history
    assert not torch.equal(p1, p3)
    assert r1.history[r1.best_epoch]["val/f1_weighted"] == r1.best_val["f1_weighted"]


def test_memory_and_streamed_batches_cover_the_same_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 2)).astype(np.float32)
    y = np.arange(103) % 3
    attrs = {"task": "classification", "class_names": ["a", "b", "c"], "modalities": ["x"],
             "teacher_modality": "x", "student_modality": "x", "ignore_index": None, "source_checksum": "t"}
    with PreparedWriter(tmp_path / "d.h5", attrs, chunk_rows=10) as w:
        w.write("train", {"x": x, "labels": y})
    mem = load_split(tmp_path / "d.h5", "train", attrs, in_memory=True)
    stream = load_split(tmp_path / "d.h5", "train", attrs, in_memory=False)
    for data in (mem, stream):
        batches = list(data.batches(16, shuffle=True, seed=3))
        idx = torch.cat([b["index"] for b in batches])
        assert sorted(idx.tolist()) == list(range(103))
        assert all(len(b["index"]) == 16 for b in batches[:-1])
        for b in batches:  # rows stay aligned with their labels and inputs
            np.testing.assert_array_equal(b["target"].numpy(), y[b["index"].numpy()])
            np.testing.assert_array_equal(b["student_input"].numpy(), x[b["index"].numpy()])
    # Two ranks get disjoint shares of equal length.
    r0 = torch.cat([b["index"] for b in mem.batches(16, True, 3, rank=0, world=2)])
    r1 = torch.cat([b["index"] for b in mem.batches(16, True, 3, rank=1, world=2)])
    assert len(r0) == len(r1) == 51 and not set(r0.tolist()) & set(r1.tolist())


def test_stored_uint8_inputs_are_normalised_in_every_batch(tmp_path):
    """uint8 images with a `normalise` attribute load as float32 (x / 255 - mean) / std, equal
    to what `prepare` stored as float32 before (x * (1 / (255 std)) - mean / std in float32)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 3, 4, 5), dtype=np.uint8)
    rgb[0, :, 0, :3] = [[0, 128, 255]] * 3
    lidar = rng.normal(size=(7, 2, 4, 5)).astype(np.float16)
    y = rng.integers(-1, 3, (7, 4, 5)).astype(np.int8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    attrs = {"task": "segmentation", "class_names": ["a", "b", "c"], "modalities": ["rgb", "lidar"],
             "teacher_modality": "rgb", "student_modality": "lidar", "ignore_index": -1, "source_checksum": "t",
             "normalise": {"rgb": {"scale": 255.0, "mean": mean, "std": std}}}
    with PreparedWriter(tmp_path / "d.h5", attrs, chunk_rows=2) as w:
        w.write("train", {"rgb": rgb, "lidar": lidar, "labels": y})
    attrs = read_attrs(tmp_path / "d.h5")
    old = np.empty(rgb.shape, np.float32)  # the float32 rows the earlier `prepare` wrote
    for c in range(3):
        old[:, c] = rgb[:, c] * np.float32(1.0 / (255.0 * std[c])) - np.float32(mean[c] / std[c])
    exact = (rgb / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    for in_memory in (True, False):
        data = load_split(tmp_path / "d.h5", "train", attrs, in_memory=in_memory)
        assert data.sample_shape("teacher_input") == (3, 4, 5)
        for _ in range(2):  # normalising a batch leaves the stored inputs as they were
            for b in data.batches(3, shuffle=True, seed=1):
                idx = b["index"].numpy()
                assert b["teacher_input"].dtype == torch.float32 and b["target"].dtype == torch.int64
                np.testing.assert_array_equal(b["teacher_input"].numpy(), old[idx])
                np.testing.assert_allclose(b["teacher_input"].numpy(), exact[idx], rtol=0, atol=1e-6)
                np.testing.assert_array_equal(b["student_input"].numpy(), lidar[idx])  # not normalised
                np.testing.assert_array_equal(b["target"].numpy(), y[idx])
    # Attaching or dropping cached logits keeps the normalisation.
    data = load_split(tmp_path / "d.h5", "train", attrs, in_memory=True)
    derived = data.with_teacher_logits(torch.zeros(7, 3, 4, 5)).without("teacher_logits")
    assert torch.equal(next(derived.batches(7))["teacher_input"], next(data.batches(7))["teacher_input"])


def test_augmentation_keeps_modalities_and_target_aligned():
    base = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4).repeat(4, 1, 1, 1)
    batch = {"teacher_input": base.repeat(1, 3, 1, 1), "student_input": base.clone(), "target": base[:, 0].long()}
    out = augment_batch(batch, "flip_rot90", torch.Generator().manual_seed(0))
    assert torch.equal(out["teacher_input"][:, :1], out["student_input"])
    assert torch.equal(out["target"], out["student_input"][:, 0].long())
    assert not torch.equal(out["student_input"], base)  # something was transformed
    for i in range(len(base)):  # every sample is one of the 8 symmetries of the original
        variants = [torch.rot90(v, k, (-2, -1)) for v in (base[i], base[i].flip(-1)) for k in range(4)]
        assert any(torch.equal(out["student_input"][i], v) for v in variants)


def test_ddp_two_cpu_processes_agree(tmp_path):
    env = tool_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "ddp_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["params"] == r1["params"]  # gradients were all-reduced: replicas stay identical
    # Two ranks x 32 rows average to the gradient of the same 64 rows in one process.
    from tests.ddp_worker import train

    reference = train(batch_size=64)
    np.testing.assert_allclose(np.array(r0["params"]), reference.numpy(), atol=2e-5)
    assert not np.allclose(np.array(r0["params"]), _initial_params(), atol=1e-3)


@pytest.mark.slow
def test_ddp_ranks_evaluate_their_share_and_reduce_the_metrics(tmp_path):
    """Under torchrun every rank evaluates its own rows (together each row once, in memory and
    streamed with a loader worker) and torchmetrics sums the states: each rank reports the
    metrics of the whole split, equal to one process's. Training on a streamed split with
    loader workers, augmentation and a schedule runs on both ranks and keeps them in sync."""
    from tests.ddp_eval_worker import evaluate_all, write_data

    write_data(tmp_path / "d.h5")
    env = tool_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "ddp_eval_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"eval_rank{r}.json").read_text()) for r in (0, 1)]
    single = evaluate_all(tmp_path / "d.h5")
    for kind in ("memory", "stream"):
        assert single[kind]["rows"] == 37
        assert ranks[0]["eval"][kind]["rows"] + ranks[1]["eval"][kind]["rows"] == 37  # shares, not copies
        assert min(r["eval"][kind]["rows"] for r in ranks) > 0
        for r in ranks:
            assert r["eval"][kind]["miou"] == pytest.approx(single[kind]["miou"], abs=1e-12)
            assert r["eval"][kind]["accuracy"] == pytest.approx(single[kind]["accuracy"], abs=1e-12)
    assert ranks[0]["train"] == ranks[1]["train"]  # replicas identical, same reduced validation metric


def _initial_params():
    seed_everything(0)
    model = build_model({"arch": "mlp", "hidden": [16]}, (8,), 3)
    return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()


def _run_stage(cwd, env, *args):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_killed_training_resumes_to_the_same_metrics(tmp_path):
    env = tool_env(tmp_path)
    results = {}
    for name in ("straight", "killed"):
        repo = copy_pipeline(tmp_path / name)
        params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), epochs=25)
        params["data"]["synthetic"]["n_samples"] = 3000
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in ("download", "prepare"):
            assert subprocess.run([sys.executable, "-m", "stages", stage, "--dataset", "synthetic"],
                                  cwd=repo, env=env).returncode == 0
        cmd = ("stages", "train", "--dataset", "synthetic", "--role", "teacher", "--no-progress")
        if name == "killed":
            ckpt = repo / "data/checkpoints/synthetic/teacher/seed0/last.pt"
            proc = _run_stage(repo, env, *cmd)
            deadline = time.time() + 120
            while time.time() < deadline:
                if ckpt.exists():
                    try:
                        epoch = torch.load(ckpt, weights_only=True)["epoch"]
                    except Exception:
                        epoch = -1  # being replaced right now
                    if epoch >= 3:
                        break
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            assert not (repo / "data/runs/synthetic/teacher").exists()  # nothing half-written
            killed_at = torch.load(ckpt, weights_only=True)["epoch"]
            assert killed_at < 24, "training finished before the kill; the test proves nothing"
        proc = _run_stage(repo, env, *cmd)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results[name] = json.loads((repo / "data/runs/synthetic/teacher/metrics.json").read_text())
    assert results["killed"] == results["straight"]



def _stage_env(tmp_path, workers):
    return {**tool_env(tmp_path), "CMKD_SEED_WORKERS": str(workers)}


def _child_pids(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="seed workers fork (Linux only)")
def test_dvclive_seed_workers_give_the_same_run_and_die_with_a_killed_stage(tmp_path):
    """A stage training its seeds in 1 or 2 processes writes identical metrics and models; a
    SIGKILLed stage leaves no seed worker running."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = tiny_params(base, seeds=(0, 1, 2), epochs=3)
    runs = {}
    for workers in (1, 2):
        repo = copy_pipeline(tmp_path / f"w{workers}")
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        env = _stage_env(tmp_path, workers)
        if workers == 1:
            for stage in ("download", "prepare"):
                assert subprocess.run([sys.executable, "-m", "stages", stage, "--dataset", "synthetic"],
                                      cwd=repo, env=env).returncode == 0
        else:  # the same prepared data
            shutil.copytree(tmp_path / "w1" / "data" / "prepared", repo / "data" / "prepared")
        for args in (("--role", "teacher"), ("--run", "kdv1")):
            proc = subprocess.run([sys.executable, "-m", "stages", "train", "--dataset", "synthetic", *args,
                                   "--no-progress"],
                                  cwd=repo, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
        runs[workers] = repo / "data/runs/synthetic"
    for run in ("teacher", "kdv1"):
        assert (json.loads((runs[1] / run / "metrics.json").read_text())
                == json.loads((runs[2] / run / "metrics.json").read_text()))
        for seed in (0, 1, 2):
            files = sorted(p.name for p in (runs[1] / run / f"seed{seed}").glob("*.pt"))
            assert files
            for name in files:
                one = torch.load(runs[1] / run / f"seed{seed}" / name, weights_only=True)
                two = torch.load(runs[2] / run / f"seed{seed}" / name, weights_only=True)
                assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

    # Kill a stage while its two seed workers train: the workers go with it.
    repo = runs[2].parents[2]
    params["train"]["synthetic"]["teacher"]["epochs"] = 400
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _run_stage(repo, _stage_env(tmp_path, 2), "stages", "train", "--dataset", "synthetic", "--role", "teacher",
                      "--no-progress")
    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and len(workers) < 2:
        workers = _child_pids(proc.pid) if proc.poll() is None else []
        time.sleep(0.05)
    assert len(workers) >= 2, "the stage never started its seed workers"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "seed workers outlived their killed stage"


def test_cmkd_errors_survive_pickling():
    """Errors raised in worker processes come back through pickle with their fields."""
    import pickle

    from cmkd.errors import ChecksumError, ConfigError, DataFormatError

    for err in (ConfigError("runs.x.temperature", "must be > 0"), DataFormatError("a/b.bin", "truncated"),
                ChecksumError("c.zip", "sha256 differs")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert back.__dict__ == err.__dict__
