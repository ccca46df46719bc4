"""The streamed input pipeline (cmkd/data/loader.py): batch plans, workers, augmentation."""

import hashlib

import h5py
import numpy as np
import pytest
import torch

from cmkd.data.h5 import PreparedWriter
from cmkd.data.loader import LoaderConfig, batch_plan
from cmkd.training.data import load_split
from cmkd.training.logit_cache import LOGITS_CHECKSUM_ATTR


def _write(tmp_path, n=70, chunk_rows=8):
    """Images whose every pixel encodes (row, channel, y, x), so any misalignment shows."""
    rows = np.arange(n, dtype=np.float32)[:, None, None, None]
    yy, xx = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    base = rows * 1000 + (yy * 6 + xx)[None, None].astype(np.float32)  # [n, 1, 6, 6]
    rgb = np.concatenate([base, base + 0.25, base + 0.5], axis=1)
    labels = (base[:, 0] % 7).astype(np.int16)
    attrs = {"task": "segmentation", "class_names": list("abcdefg"), "modalities": ["rgb", "lidar"],
             "teacher_modality": "rgb", "student_modality": "lidar", "ignore_index": -1, "source_checksum": "t"}
    with PreparedWriter(tmp_path / "d.h5", attrs, chunk_rows=chunk_rows) as w:
        w.write("train", {"rgb": rgb, "lidar": base, "labels": labels})
    return tmp_path / "d.h5", attrs, base


def _epoch(data, workers, seed=5, augment="flip_rot90", batch_size=6, **kw):
    cfg = LoaderConfig(workers=workers, prefetch=2, persistent=workers > 0, buffer_chunks=3)
    return [{k: v.clone() for k, v in b.items()} for b in
            data.batches(batch_size, shuffle=True, seed=seed, augment=augment, aug_seed=seed + 1, loader=cfg, **kw)]


def test_batches_are_the_plan_whatever_the_number_of_workers(tmp_path):
    path, attrs, base = _write(tmp_path)
    data = load_split(path, "train", attrs, in_memory=False)
    runs = {w: _epoch(data, w) for w in (0, 1, 2)}
    plan = batch_plan(70, 8, 6, shuffle=True, seed=5, buffer_chunks=3)
    for w, batches in runs.items():
        assert [b["index"].tolist() for b in batches] == [p.tolist() for p in plan], w
        for b, ref in zip(batches, runs[0]):  # contents too, augmentation included
            for k in ref:
                assert torch.equal(b[k], ref[k]), (w, k)
    assert sorted(torch.cat([b["index"] for b in runs[0]]).tolist()) == list(range(70))
    # deterministic given the seed; another seed is another order
    assert [b["index"].tolist() for b in _epoch(data, 2)] == [p.tolist() for p in plan]
    assert [b["index"].tolist() for b in _epoch(data, 0, seed=6)] != [p.tolist() for p in plan]


def test_persistent_workers_follow_each_epochs_plan(tmp_path):
    path, attrs, _ = _write(tmp_path)
    data = load_split(path, "train", attrs, in_memory=False)
    cfg = LoaderConfig(workers=2, persistent=True, buffer_chunks=3)
    for seed in (1, 2, 1):
        got = [b["index"].tolist() for b in data.batches(6, shuffle=True, seed=seed, loader=cfg)]
        assert got == [p.tolist() for p in batch_plan(70, 8, 6, shuffle=True, seed=seed, buffer_chunks=3)]
    assert len(data.stream["loaders"]) == 1  # one DataLoader, its workers kept across epochs


def test_plan_is_chunk_aware_and_shards_evenly_or_completely():
    n, chunk, buf = 100, 8, 3
    rng = np.random.default_rng(7)
    order = rng.permutation(13)  # the plan's own chunk order for seed 7
    plan = batch_plan(n, chunk, 12, shuffle=True, seed=7, buffer_chunks=buf)
    rows = np.concatenate(plan)
    assert sorted(rows.tolist()) == list(range(n))
    # rows are shuffled only within a buffer of `buf` chunks of the shuffled chunk order
    start = 0
    for g in range(0, 13, buf):
        chunks = order[g:g + buf]
        size = sum(min(chunk, n - c * chunk) for c in chunks)
        assert set((rows[start:start + size] // chunk).tolist()) == set(chunks.tolist())
        start += size
    assert not np.array_equal(rows, np.sort(rows))
    # training shares: equal length (whole chunks only), disjoint
    shares = [np.concatenate(batch_plan(n, chunk, 12, shuffle=True, seed=7, rank=r, world=3)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == 4 * chunk
    assert len(set(np.concatenate(shares).tolist())) == 3 * 4 * chunk
    # evaluation shares: every row exactly once
    shares = [np.concatenate(batch_plan(n, chunk, 12, shuffle=False, seed=0, rank=r,
                                        world=3, even=False)) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))


def test_augmentation_in_workers_keeps_modalities_and_labels_aligned(tmp_path):
    path, attrs, base = _write(tmp_path)
    data = load_split(path, "train", attrs, in_memory=False)
    batches = _epoch(data, 2)
    transformed = 0
    for b in batches:
        idx = b["index"].numpy()
        lidar, rgb, target = b["student_input"], b["teacher_input"], b["target"]
        assert torch.equal(rgb[:, :1], lidar) and torch.equal(rgb[:, 2:] - 0.5, lidar)
        assert torch.equal(target, (lidar[:, 0] % 7).long())
        for i, row in enumerate(idx):  # each sample is one of the 8 symmetries of its own row
            src = torch.from_numpy(base[row])
            variants = [torch.rot90(v, k, (-2, -1)) for v in (src, src.flip(-1)) for k in range(4)]
            assert any(torch.equal(lidar[i], v) for v in variants)
            transformed += not torch.equal(lidar[i], src)
    assert transformed > 20


def test_streamed_teacher_logits_follow_their_rows(tmp_path):
    path, attrs, _ = _write(tmp_path)
    logits = np.arange(70 * 7 * 36, dtype=np.float32).reshape(70, 7, 6, 6)
    with h5py.File(tmp_path / "logits.h5", "w") as f:
        f["logits"] = logits
        # the checksum cmkd.training.logit_cache.cache_logits stores (verified when the cache is attached)
        f["logits"].attrs[LOGITS_CHECKSUM_ATTR] = hashlib.sha256(logits.astype("<f4").tobytes()).hexdigest()
    data = load_split(path, "train", attrs, in_memory=False).with_teacher_logits(tmp_path / "logits.h5")
    for b in _epoch(data, 2, augment=None):
        np.testing.assert_array_equal(b["teacher_logits"].numpy(), logits[b["index"].numpy()])


def test_in_memory_splits_keep_the_fast_path(tmp_path):
    path, attrs, _ = _write(tmp_path)
    data = load_split(path, "train", attrs, in_memory=True)
    plain = list(data.batches(6, shuffle=True, seed=3))
    idx = torch.randperm(70, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([b["index"] for b in plain]), idx)  # torch.randperm order, as before
    assert data.stream is None


def test_loader_config_rejects_bad_values():
    from cmkd.errors import ConfigError

    with pytest.raises(ConfigError, match="k.loader.prefetch"):
        LoaderConfig.from_params({"prefetch": 0}, "k.loader")
    assert LoaderConfig.from_params({"workers": 2}, "k").workers == 2


def test_gpu_check_says_there_is_no_cuda_and_exits_0(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out",
                           str(tmp_path / "g.json")],
                          capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout and not (tmp_path / "g.json").exists()
