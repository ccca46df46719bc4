"""A user's own paired data (data.<name>.kind: paired, docs/own-data.md): the files in the
contract's format, prepare, the defaults chosen from the input shapes, the stages on it, and one
clear line naming file and array for each bad input, with nothing written."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from cmkd.config import validate_params
from cmkd.data.datasets import paired
from cmkd.data.h5 import PreparedSplit, read_attrs
from cmkd.errors import ConfigError, DataFormatError
from cmkd.training.resolve import resolve_roles
from tests.conftest import REPO, copy_pipeline, dvc, stages_run, tool_env

SIZES = {"train": 90, "val": 30, "test": 30}


def make_arrays(kind: str, task: str, n: int, rng: np.random.Generator, n_classes: int = 3, size: int = 8):
    """A teacher modality that shows the label and a noisier student one."""
    if task == "segmentation":
        labels = rng.integers(0, n_classes, (n, size, size))
        labels[:, 0, :] = 255  # an unlabelled row of pixels
        signal = np.where(labels == 255, 0, labels).astype(np.float64)[:, None]
        teacher = np.concatenate([signal, rng.normal(size=signal.shape)], axis=1) * 10 + 3
        student = signal + rng.normal(scale=1.5, size=signal.shape)
        return teacher.astype(np.float32), (student * 50).astype(np.int16), labels.astype(np.uint8)
    labels = rng.integers(0, n_classes, n)
    if kind == "vector":
        centres = np.eye(n_classes, 6) * 3
        teacher = centres[labels] + rng.normal(size=(n, 6))
        student = np.concatenate([centres[labels] + rng.normal(scale=2, size=(n, 6)), rng.normal(size=(n, 2))], axis=1)
        return teacher * 5 + 100, student.astype(np.float32), labels
    teacher = labels[:, None, None, None] + rng.normal(size=(n, 3, size, size))
    student = rng.integers(0, 255, (n, 1, size, size)).astype(np.uint8)
    return teacher.astype(np.float32), student, labels


def write_split(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=a, chunks=(min(8, len(a)),) + a.shape[1:])


def make_paired(folder: Path, kind="vector", task="classification", fmt="npz", seed=0, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in SIZES.items():
        t, s, y = make_arrays(kind, task, n, rng, **kw)
        write_split(folder / f"{split}.{fmt}", {"rgb": t, "depth": s, "labels": y})
    return folder


def block(folder: Path, task="classification", **extra) -> dict:
    return {"kind": "paired", "path": str(folder), "teacher_modality": "rgb", "student_modality": "depth",
            "task": task, **extra}


def prepare(cfg: dict, out_dir: Path) -> Path:
    out = out_dir / "prepared" / "mine.h5"
    paired.prepare(cfg, out_dir / "raw" / "mine", out, progress=False)
    return out


def load(path: Path, split: str) -> dict[str, np.ndarray]:
    return PreparedSplit(path, split).load(["rgb", "depth", "labels"])


# --------------------------------------------------------------------------- prepare


def test_vectors_are_standardised_per_feature_from_the_training_split_only(tmp_path):
    src = make_paired(tmp_path / "src")
    out = prepare(block(src), tmp_path)
    raw = {s: np.load(src / f"{s}.npz") for s in SIZES}
    mean, std = raw["train"]["rgb"].mean(axis=0), raw["train"]["rgb"].std(axis=0)
    train, val = load(out, "train"), load(out, "val")
    np.testing.assert_allclose(train["rgb"].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train["rgb"].std(axis=0), 1, atol=1e-5)
    # val with the training split's statistics, not its own
    np.testing.assert_allclose(val["rgb"], (raw["val"]["rgb"] - mean) / std, rtol=1e-5, atol=1e-5)
    assert not np.allclose(val["rgb"].mean(axis=0), 0, atol=1e-3)
    np.testing.assert_array_equal(val["labels"], raw["val"]["labels"])
    attrs = read_attrs(out)
    assert attrs["task"] == "classification" and attrs["class_names"] == ["0", "1", "2"]
    assert (attrs["teacher_modality"], attrs["student_modality"]) == ("rgb", "depth")
    for split in SIZES:
        digest = hashlib.sha256((src / f"{split}.npz").read_bytes()).hexdigest()
        assert attrs["source_files"][split] == {"file": f"{split}.npz", "sha256": digest}
    assert attrs["source_checksum"].startswith("sha256:")
    assert attrs["standardised"]["depth"]["per"] == "feature" and len(attrs["standardised"]["depth"]["mean"]) == 8


def test_h5_images_are_read_in_blocks_per_channel_and_segmentation_ignore_becomes_minus_one(tmp_path, monkeypatch):
    src = make_paired(tmp_path / "src", kind="image", task="segmentation", fmt="h5")
    cfg = block(src, task="segmentation", class_names=["floor", "wall", "chair"])
    whole = prepare(cfg, tmp_path / "whole")
    reads = []
    original = paired.SplitFile.blocks

    def counted(self, names):
        for start, arrays in original(self, names):
            reads.append(len(arrays["labels"]))
            yield start, arrays

    # one sample's rgb is 2 x 8 x 8 float32 = 512 bytes: blocks of 5 rows, never a whole split
    monkeypatch.setattr(paired, "READ_BYTES", 5 * 512)
    monkeypatch.setattr(paired.SplitFile, "blocks", counted)
    chunked = prepare(cfg, tmp_path / "chunked")
    assert max(reads) == 5
    for split in SIZES:
        a, b = load(whole, split), load(chunked, split)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-5)
    train = load(chunked, "train")
    np.testing.assert_allclose(train["rgb"].mean(axis=(0, 2, 3)), 0, atol=1e-5)  # per channel
    np.testing.assert_allclose(train["depth"].std(axis=(0, 2, 3)), 1, atol=1e-5)
    with h5py.File(src / "train.h5") as f:
        labels = f["labels"][()]
    assert train["labels"].dtype == np.int16
    np.testing.assert_array_equal(train["labels"] == -1, labels == 255)
    np.testing.assert_array_equal(train["labels"][labels != 255], labels[labels != 255])
    attrs = read_attrs(chunked)
    assert attrs["class_names"] == ["floor", "wall", "chair"] and attrs["ignore_index"] == -1
    assert attrs["source_ignore_index"] == 255 and attrs["standardised"]["rgb"]["per"] == "channel"


# --------------------------------------------------------------------------- bad input


def _rewrite(folder: Path, split: str, change) -> Path:
    path = folder / f"{split}.npz"
    arrays = dict(np.load(path))
    change(arrays)
    np.savez(path, **arrays)
    return path


def _nan(a):
    a["rgb"] = a["rgb"].copy()
    a["rgb"][7, 2] = np.nan


def _inf(a):
    a["depth"] = a["depth"].copy()
    a["depth"][3, 0] = np.inf


BAD = {
    "missing split file": (lambda f: (f / "test.npz").unlink() or f / "test.npz", {}, "test.npz", "missing split file"),
    "missing array": (lambda f: _rewrite(f, "val", lambda a: a.pop("depth")), {}, "val.npz", "'depth': missing"),
    "no such modality": (lambda f: f / "train.npz", {"teacher_modality": "lidar"}, "train.npz", "'lidar': missing"),
    "unequal lengths": (lambda f: _rewrite(f, "train", lambda a: a.update(labels=a["labels"][:-1])), {},
                        "train.npz", "'labels': 89 rows, but 'rgb' has 90"),
    "non-integer labels": (lambda f: _rewrite(f, "val", lambda a: a.update(labels=np.r_[0.5, a["labels"][1:]])), {},
                           "val.npz", "'labels': non-integer label 0.5 in row 0"),
    "negative labels": (lambda f: _rewrite(f, "test", lambda a: a["labels"].__setitem__(4, -2)), {},
                        "test.npz", "'labels': negative label -2 in row 4"),
    "NaN": (lambda f: _rewrite(f, "train", _nan), {}, "train.npz", "'rgb': NaN or infinite value in row 7"),
    "infinite": (lambda f: _rewrite(f, "val", _inf), {}, "val.npz", "'depth': NaN or infinite value in row 3"),
    "3-d image": (lambda f: _rewrite(f, "train", lambda a: a.update(rgb=a["rgb"][:, :, None].repeat(2, 2))), {},
                  "train.npz", "'rgb': shape (90, 6, 2): an image array must be 4-dimensional"),
    "label beyond class_names": (lambda f: f / "train.npz", {"class_names": ["a", "b"]}, ".npz",
                                 "'labels': label 2 in row"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_file_and_array_and_writes_nothing(case, tmp_path):
    damage, extra, file_name, problem = BAD[case]
    src = make_paired(tmp_path / "src")
    damage(src)
    cfg = block(src, **extra)
    for check in (lambda: paired.check_sources(cfg, "data.mine"), lambda: prepare(cfg, tmp_path)):
        with pytest.raises(DataFormatError) as err:
            check()
        message = str(err.value)
        assert "\n" not in message and str(src) in message and file_name in message and problem in message, message
    # nothing written: no prepared file, no temporary beside it
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_segmentation_labels_other_than_ignore_index_must_not_be_negative(tmp_path):
    src = make_paired(tmp_path / "src", kind="image", task="segmentation")
    _rewrite(src, "val", lambda a: a.update(labels=np.where(a["labels"] == 255, -1, a["labels"].astype(np.int16))))
    expected = r"val\.npz: array 'labels': negative label -1 in row 0 \(only ignore_index 255"
    with pytest.raises(DataFormatError, match=expected):
        paired.check_sources(block(src, task="segmentation"), "data.mine")
    paired.check_sources(block(src, task="segmentation", ignore_index=-1), "data.mine")  # declared: fine


def test_validate_stage_catches_bad_files_before_any_stage(tmp_path):
    src = make_paired(tmp_path / "src")
    _rewrite(src, "train", _nan)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["mine"]
    params["data"]["mine"] = block(src)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages", "validate", "--params", str(tmp_path / "params.yaml")],
                          cwd=REPO, capture_output=True, text=True, env=tool_env(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {src / 'train.npz'}: array 'rgb': NaN or infinite value in row 7"


# --------------------------------------------------------------------------- params


def _params(**data) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["mine"]
    params["data"]["mine"] = {"kind": "paired", "path": "/nowhere", "teacher_modality": "rgb",
                              "student_modality": "depth", "task": "classification", **data}
    return params


def test_the_contract_block_needs_no_models_or_train_block():
    params = _params()
    assert "mine" not in params["models"] and "mine" not in params["train"]
    validate_params(params)  # reads no file: every stage runs this


@pytest.mark.parametrize("change,key", [
    (lambda p: p["data"]["mine"].update(task="detection"), "data.mine.task"),
    (lambda p: p["data"]["mine"].update(teacher_modality="depth"), "data.mine.student_modality"),
    (lambda p: p["data"]["mine"].update(colour="rgb"), "data.mine.colour"),
    (lambda p: p["data"]["mine"].update(ignore_index=255), "data.mine.ignore_index"),
    (lambda p: p["data"]["mine"].update(kind="unpaired"), "data.mine.kind"),
    (lambda p: p["models"].update(mine={"teacher": {"arch": "vit"}}), "models.mine.teacher.arch"),
    (lambda p: p["train"].update(mine={"student": {"epochs": 0}}), "train.mine.student.epochs"),
    (lambda p: (p["data"].update(digits=p["data"]["mine"]), p.update(datasets=["digits"])), "data.digits.kind"),
])
def test_bad_paired_params_name_the_key(change, key):
    params = _params()
    change(params)
    with pytest.raises(ConfigError) as err:
        validate_params(params)
    assert str(err.value).startswith(f"params.yaml: {key}:")


@pytest.mark.parametrize("task,shape,arch", [
    ("classification", (8,), "mlp"), ("classification", (3, 16, 16), "small_cnn"),
    ("classification", (3, 64, 64), "resnet18"), ("segmentation", (4, 48, 64), "seg_resnet"),
])
def test_defaults_are_chosen_from_the_input_shapes(task, shape, arch):
    roles = resolve_roles(_params(task=task), "mine", (task, shape, (5,) if task == "classification" else shape))
    assert roles["teacher"]["model"]["arch"] == arch
    assert roles["student"]["model"]["arch"] == ("mlp" if task == "classification" else arch)
    assert arch in roles["teacher"]["origin"] and "input shapes" in roles["teacher"]["origin"]


def test_params_blocks_override_the_defaults():
    params = _params()
    params["models"]["mine"] = {"teacher": {"hidden": [16]}, "student": {"arch": "small_cnn", "width": 4}}
    params["train"]["mine"] = {"student": {"epochs": 3}}
    roles = resolve_roles(params, "mine", ("classification", (8,), (1, 8, 8)))
    assert roles["teacher"]["model"] == {"arch": "mlp", "hidden": [16]}  # merged over the default mlp
    assert roles["student"]["model"] == {"arch": "small_cnn", "width": 4}  # another arch: replaced
    assert roles["student"]["train"]["epochs"] == 3 and roles["student"]["train"]["lr"] == 0.002
    assert "overridden by models.mine.student and train.mine.student" in roles["student"]["origin"]


def test_registered_datasets_get_their_params_blocks_unchanged():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for ds in params["datasets"]:
        roles = resolve_roles(params, ds)
        for role in ("teacher", "student"):
            assert roles[role] == {"model": params["models"][ds][role], "train": params["train"][ds][role],
                                   "origin": "params"}


# --------------------------------------------------------------------------- the pipeline


def _git(repo: Path, env, *args):
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def mine_pipeline(tmp_path_factory):
    """`dvc repro diagnose@mine` and then `dvc repro evaluate@mine` on a vector dataset given by
    the contract's block alone (no models / train block), in a temporary copy of the repo."""
    tmp = tmp_path_factory.mktemp("paired")
    src = make_paired(tmp / "mine")
    repo = copy_pipeline(tmp / "repo")
    env = tool_env(tmp)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(datasets=["mine", "synthetic"], methods=["kdv1"], seeds=[0])
    params["data"]["mine"] = block(src)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, env, "init", "-q")
    dvc(["init", "-q"], repo, env)
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-qm", "pipeline")
    diagnose = dvc(["repro", "diagnose@mine"], repo, env)
    evaluate = dvc(["repro", "evaluate@mine"], repo, env)
    return repo, env, src, diagnose, evaluate


def test_diagnosis_and_table_on_the_users_data(mine_pipeline):
    repo, env, src, diagnose, evaluate = mine_pipeline
    assert "Running stage 'resolve'" in diagnose.stdout
    assert {"download@mine", "prepare@mine", "train_teacher@mine", "train_student@mine",
            "diagnose@mine"} <= stages_run(diagnose.stdout)
    assert not any("synthetic" in s for s in stages_run(diagnose.stdout))  # only the named dataset's branch
    resolved = json.loads((repo / "data/resolved/mine/teacher.json").read_text())
    assert resolved["model"] == {"arch": "mlp", "hidden": [128, 128]} and resolved["train"]["epochs"] == 20
    sources = json.loads((repo / "data/resolved/mine/sources.json").read_text())
    assert sources["sha256"]["train.npz"] == hashlib.sha256((src / "train.npz").read_bytes()).hexdigest()
    note = ("teacher mlp chosen from the input shapes (vectors of 6); "
            "student mlp chosen from the input shapes (vectors of 8)")
    assert note in (repo / "data/diagnosis/mine.md").read_text()
    table = (repo / "data/reports/mine/table.md").read_text()
    assert note in table and "selected_on: default" in table
    assert "| TEACHER |" in table and "| kdv1 |" in table
    report = json.loads((repo / "data/reports/mine/metrics.json").read_text())
    assert set(report["rows"]) == {"teacher", "student", "kdv1"} and report["rows"]["kdv1"]["selected_on"] == "default"
    assert report["rows"]["teacher"]["f1_weighted"]["mean"] > 0.6  # the teacher modality shows the label


def test_only_a_change_of_the_users_files_reruns_prepare_and_what_follows(mine_pipeline):
    repo, env, src, _, _ = mine_pipeline
    again = dvc(["repro", "evaluate@mine"], repo, env)
    assert stages_run(again.stdout) == set() and "Running stage 'resolve'" in again.stdout
    # another dataset's model: the resolved files of mine are unchanged, so nothing of mine reruns
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["synthetic"]["teacher"]["hidden"] = [64]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    # (method_code depends on params.yaml as a whole file: it reruns, its outputs are unchanged)
    assert stages_run(dvc(["repro", "evaluate@mine"], repo, env).stdout) == {"method_code"}
    make_paired(src, seed=1)  # the user's files change, their path and params do not
    ran = stages_run(dvc(["repro", "evaluate@mine"], repo, env).stdout)
    assert ran == {"prepare@mine", "train_teacher@mine", "train_student@mine", "distill@mine-kdv1", "evaluate@mine"}


@pytest.mark.slow
def test_images_classification_and_segmentation_through_the_pipeline(tmp_path):
    """Image classification (.npz) and segmentation (.h5, ignore_index, class names, a train
    override) from prepare to the table, through `dvc repro`."""
    repo = copy_pipeline(tmp_path / "repo")
    env = tool_env(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(datasets=["images", "scenes"], methods=["kdv1", "mlkd"], seeds=[0])
    params["data"]["images"] = block(make_paired(tmp_path / "images", kind="image"))
    params["data"]["scenes"] = block(make_paired(tmp_path / "scenes", kind="image", task="segmentation", fmt="h5"),
                                     task="segmentation", class_names=["floor", "wall", "chair"])
    params["train"]["scenes"] = {"teacher": {"epochs": 2}, "student": {"epochs": 2}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(["init", "--no-scm", "-q"], repo, env)
    ran = stages_run(dvc(["repro", "evaluate@images", "evaluate@scenes", "diagnose@images", "diagnose@scenes"],
                         repo, env).stdout)
    assert {"prepare@scenes", "distill@scenes-kdv1", "diagnose@scenes", "evaluate@images"} <= ran
    images = (repo / "data/reports/images/table.md").read_text()
    assert "teacher small_cnn chosen from the input shapes (3x8x8 images)" in images
    scenes = (repo / "data/reports/scenes/table.md").read_text()
    assert "seg_resnet chosen from the input shapes (2x8x8 images), overridden by train.scenes.teacher" in scenes
    report = json.loads((repo / "data/reports/scenes/metrics.json").read_text())
    assert report["task"] == "segmentation" and report["rows"]["kdv1"]["miou"]["n"] == 1
    assert json.loads((repo / "data/resolved/scenes/student.json").read_text())["train"]["epochs"] == 2
    assert (repo / "data/diagnosis/scenes.json").exists()
