"""DVCLive per-epoch logging, detached from the DVC repository around it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# DVCLive ties each Live to the DVC repository around it, for one logger per experiment; a
# stage runs one logger per seed, several at once (train_run's seed workers), and must write
# only their own folders. dvclive.live looks these names up at each call, and no option or
# environment variable turns them off (`dvcyaml=None`, `save_dvc_exp=False` do not reach them;
# DVCLIVE_TEST moves `dir` and rejects `dvcyaml=None`), hence this patch, scoped to cmkd's calls:
#   mark_dvclive_step_completed / cleanup_dvclive_step_completed: every next_step() writes
#     <$DVC_ROOT or the cwd's repo>/.dvc/tmp/exps/run/DVCLIVE_STEP_COMPLETED (a hint for VS
#     Code) and end() removes it after an exists() check: two seeds ending together raise
#     FileNotFoundError;
#   get_dvc_repo: each Live() opens a dvc Repo (its state databases in DVC's site cache dir are
#     written), and under `dvc exp run` end() `git add`s untracked files of `dir` with it;
#   get_dvc_studio_config: live-metric posts to Studio, where parallel seeds would interleave.
# What a logger writes in its `dir` (metrics.json, plots/metrics/**.tsv) depends on none of them.
_LIVE_DETACHED = {
    "get_dvc_repo": lambda: None,
    "get_dvc_studio_config": lambda live: {},
    "mark_dvclive_step_completed": lambda step: None,
    "cleanup_dvclive_step_completed": lambda: None,
}
_LIVE_LOCK = threading.Lock()  # one thread patches and restores at a time


@contextlib.contextmanager
def _detached_dvclive() -> Iterator[None]:
    from unittest import mock

    import dvclive.live

    with _LIVE_LOCK, mock.patch.multiple(dvclive.live, **_LIVE_DETACHED):
        yield


class LiveLog:
    """A run's DVCLive logger that writes only in its `log_dir`: never in the DVC repository
    around it (see _LIVE_DETACHED), so the seed workers of a stage cannot race on shared files."""

    def __init__(self, log_dir: str | Path):
        from dvclive import Live

        with _detached_dvclive():
            self._live = Live(dir=str(log_dir), resume=False, save_dvc_exp=False, dvcyaml=None)

    def record(self, record: Mapping[str, Any]) -> None:
        """Log one epoch's values (all but "epoch") and close the step."""
        with _detached_dvclive():
            for k, v in record.items():
                if k != "epoch":
                    self._live.log_metric(k, v)
            self._live.next_step()

    def end(self) -> None:
        with _detached_dvclive():
            self._live.end()


def open_live(log_dir: str | Path, history: list[dict[str, Any]]) -> LiveLog:
    """A DVCLive logger in `log_dir` holding the epochs of `history` already, at their steps.

    A resumed run writes its outputs into a new temporary folder, so the curves of the epochs
    before the kill are logged again from the checkpoint's history: the files are the same as an
    uninterrupted run's (DVCLive writes no timestamps)."""
    live = LiveLog(log_dir)
    for record in history:
        live.record(record)
    return live
