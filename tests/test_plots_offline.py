"""`dvc plots show` renders offline (no remote script) with the project's page and templates,
each plot once; the per-epoch curves come from the DVCLive logs."""

import re
import shutil
import subprocess

import pytest
import yaml

from cmkd.reporting.curves import curves_csv
from tests.conftest import REPO, dvc, tool_env


def _live(run_dir, seed, values):
    d = run_dir / f"seed{seed}" / "live" / "plots" / "metrics" / "val"
    d.mkdir(parents=True)
    d.joinpath("f1_weighted.tsv").write_text(
        "step\tf1_weighted\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))


def test_curves_are_the_mean_over_seeds_per_epoch(tmp_path):
    _live(tmp_path / "kdv1", 0, [0.5, 0.7])
    _live(tmp_path / "kdv1", 1, [0.3, 0.9])
    _live(tmp_path / "student", 0, [0.4])
    text = curves_csv([tmp_path / "student", tmp_path / "kdv1"], "val", "f1_weighted")
    assert text.splitlines() == ["run,epoch,score", "student,0,0.400000", "kdv1,0,0.400000", "kdv1,1,0.800000"]


def test_every_plot_is_declared_once():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    top = [next(iter(p)) if isinstance(p, dict) else p for p in spec.get("plots", [])]
    staged = [next(iter(p)) for s in spec["stages"].values() for p in (s.get("do", s).get("plots") or [])]
    assert len(top) == len(set(top)) and not set(top) & set(staged)


def test_dvc_plots_show_loads_no_remote_script(tmp_path):
    pytest.importorskip("vl_convert")
    from stages.plots_page import offline_page

    repo = tmp_path / "repo"
    repo.mkdir()
    env = tool_env(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    dvc(["init", "-q"], repo, env)
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    (repo / "data").mkdir()
    (repo / "data" / "plots_offline.html").write_text(offline_page())
    shutil.copy2(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    _live(repo / "runs" / "kdv1", 0, [0.5, 0.7])
    (repo / "curves.csv").write_text(curves_csv([repo / "runs" / "kdv1"], "val", "f1_weighted"))
    (repo / "scores.csv").write_text("run,mean,std\nkdv1,0.7,0.01\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [
        {"curves.csv": {"template": "curves", "x": "epoch", "y": "score"}},
        {"scores.csv": {"template": "bar_horizontal", "x": "mean", "y": "run"}},
    ]}))
    dvc(["plots", "show", "-o", "out"], repo, env)
    page = (repo / "out" / "index.html").read_text()
    assert "vegaEmbed" in page and page.count("vegaEmbed('#") == 2
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", page, re.I), "a remote script"
    assert '"field": "run"' in page or '"field":"run"' in page  # our curves template, one line per run
