"""Seed workers logging side by side in one DVC repository, as a training stage's do under
`dvc repro`: each writes only its own DVCLive folder, so none can trip over another.

DVCLive 3.x writes <repo>/.dvc/tmp/exps/run/DVCLIVE_STEP_COMPLETED at every step and removes
it at end() after an exists() check: workers sharing the repository raced on it and one's end()
raised FileNotFoundError. The property checked is the one that rules every such race out:
nothing outside the workers' own folders changes while they run (the repository with its .git
and .dvc, the DVC site cache, HOME)."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, tool_env

WORKERS = 8
EPOCHS = 20
RESUMED = 5  # epochs replayed from a checkpoint's history, as a resumed run does

# The stage side, run as the stage command's own process: the pipeline's fork of seed workers
# (cmkd.pipeline.train.train_run), each logging through cmkd.training.live as `fit` does. All end
# at once (a barrier), the moment the FileNotFoundError came from.
_STAGE = textwrap.dedent("""
    import json, multiprocessing, os, sys, traceback
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    import dvc.scm, dvclive  # what train_run's import_before_fork loads for DVCLive
    from cmkd.training.live import open_live
    from cmkd.utils.parallel import die_with_parent

    workers, epochs, resumed = (int(a) for a in sys.argv[1:4])
    root, out = Path(sys.argv[4]), Path(sys.argv[5])
    records = [{"epoch": e, "train/loss": 1.0 / (e + 1), "val/f1": e / 7.0, "train/lr": 0.1 * 0.9 ** e}
               for e in range(epochs)]

    def snapshot():
        seen = {}
        for folder, dirs, files in os.walk(root):
            if Path(folder) == out.parent:
                dirs.remove(out.name)  # the workers' own folders
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                seen[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
        return seen

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)

    def seed_worker(seed):
        try:
            live = open_live(out / f"seed{seed}" / "live", records[:resumed])
            for record in records[resumed:]:
                live.record(record)
            barrier.wait(60)
            live.end()
            return None
        except Exception:
            return traceback.format_exc()

    before = snapshot()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent) as pool:
        errors = [e for e in pool.map(seed_worker, range(workers)) if e]
    after = snapshot()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    print(json.dumps({"errors": errors, "changed": changed}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="seed workers fork (Linux only)")
@pytest.mark.parametrize("run", ["repro", "exp_run"])
def test_dvclive_seed_workers_write_nothing_outside_their_folders(tmp_path, run):
    env = tool_env(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (git + ["init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], git + ["commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    # What DVC gives a stage's command (dvc/stage/run.py): DVC_ROOT and DVC_STAGE, the cwd the
    # repository; `dvc exp run` adds the experiment's baseline and name.
    env.update(DVC_ROOT=str(repo), DVC_STAGE="distill@synthetic-kdv1", PYTHONPATH=str(REPO))
    if run == "exp_run":
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        env.update(DVC_EXP_BASELINE_REV=head.stdout.strip(), DVC_EXP_NAME="seeds-side-by-side")
    out = repo / "data" / "runs" / "synthetic" / "kdv1"
    out.mkdir(parents=True)  # the stage's output folder (atomic_dir's), made before its workers start
    proc = subprocess.run([sys.executable, "-c", _STAGE, str(WORKERS), str(EPOCHS), str(RESUMED),
                           str(tmp_path), str(out)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["errors"] == [], "\n".join(result["errors"])
    assert result["changed"] == [], f"seed workers wrote outside their folders: {result['changed']}"
    assert not (repo / ".dvc" / "tmp" / "exps").exists()  # DVCLive's VS Code signal files

    # Each worker's folder holds exactly DVCLive's files for its epochs, the same in every one.
    folders = [out / f"seed{k}" / "live" for k in range(WORKERS)]
    files = {p.relative_to(folders[0]).as_posix() for p in folders[0].rglob("*") if p.is_file()}
    assert files == {"metrics.json", "plots/metrics/train/loss.tsv", "plots/metrics/train/lr.tsv",
                     "plots/metrics/val/f1.tsv"}
    summary = json.loads((folders[0] / "metrics.json").read_text())
    assert summary["step"] == EPOCHS - 1 and summary["train"]["loss"] == 1.0 / EPOCHS
    assert len((folders[0] / "plots/metrics/train/loss.tsv").read_text().splitlines()) == EPOCHS + 1
    for folder in folders[1:]:
        assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == files
        assert all((folder / f).read_bytes() == (folders[0] / f).read_bytes() for f in files)
