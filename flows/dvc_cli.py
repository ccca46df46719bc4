"""Run DVC as a subprocess (argument lists only) and stream its output line by line.

The flows talk to DVC through its command line, not its Python internals, for three reasons:
a stage's own output (a training loop's prints) can only be captured from a child process;
a DVC run holds DVC's repo lock and changes the working directory state, which must not
happen inside the long-lived Prefect process; and `dvc ... --json` outputs are DVC's
documented machine-readable interface. Every call uses the same interpreter's DVC
(`python -m dvc`), so the flows never pick up some other `dvc` on PATH. (Reading an
experiment's files goes through DVC's public Python API, `dvc.api.read`.)

Why not prefect-shell's ShellOperation: it runs a bash script outside any process group of
its own and cannot end the command's children when the flow is stopped, and its error has the
exit code only; see docs/prefect.md, "What stays hand-written".
"""

from __future__ import annotations

import codecs
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Lines of a failed command kept for its error message.
ERROR_TAIL_LINES = 40
# A progress bar rewrites its line with '\r'; log at most one such update per interval.
PROGRESS_LOG_INTERVAL_S = 10.0


class DvcCommandError(RuntimeError):
    """A DVC command exited non-zero; the message carries the tail of its output."""

    def __init__(self, args: Sequence[str], returncode: int, output_tail: str, what: str = ""):
        self.args_list = list(args)
        self.returncode = returncode
        self.output_tail = output_tail
        head = what or "`" + " ".join(self.args_list) + "`"
        super().__init__(f"{head} failed with exit code {returncode}:\n{output_tail}")


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    output_tail: str
    seconds: float


def dvc_args(*args: str, wait_for_lock: bool = True) -> list[str]:
    """The argument list for `dvc <args>` run with this interpreter.

    `--wait-for-lock` makes concurrent DVC processes in one repository queue on DVC's repo
    lock instead of failing: DVC holds that lock only while it checks and records a stage,
    not while the stage's command runs, so independent stages still overlap.
    """
    prefix = [sys.executable, "-m", "dvc"]
    if wait_for_lock:
        prefix.append("--wait-for-lock")
    return prefix + list(args)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands say `python ...`: make that this interpreter (its virtual environment),
    # as activating the environment would, even when the flow was started without doing so.
    bin_dir = os.path.dirname(sys.executable)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    # Stage scripts are Python: unbuffered output reaches the log as it is printed.
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


_SEGMENT = re.compile(r"([^\r\n]*)(\r\n|\r|\n)")


class _LineSplitter:
    """Turns a byte stream into log lines; '\r'-rewritten progress lines are rate limited."""

    def __init__(self, emit: Callable[[str], None], progress_interval: float):
        self._emit = emit
        self._interval = progress_interval
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._last_progress = -float("inf")
        self.tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)

    def _line(self, text: str) -> None:
        text = text.rstrip()
        if text:
            self.tail.append(text)
            self._emit(text)

    def feed(self, data: bytes) -> None:
        self._buffer += self._decoder.decode(data)
        pos = 0
        for match in _SEGMENT.finditer(self._buffer):
            text, end = match.groups()
            pos = match.end()
            if end == "\r" and match.end() == len(self._buffer):
                # Could be the first half of '\r\n': decide when more data arrives.
                pos = match.start()
                break
            if end == "\r":
                now = time.monotonic()
                if now - self._last_progress >= self._interval and text.strip():
                    self._last_progress = now
                    self._line(text)
            else:
                self._line(text)
        self._buffer = self._buffer[pos:]

    def close(self) -> None:
        self._buffer += self._decoder.decode(b"", final=True)
        for part in re.split(r"\r\n|\r|\n", self._buffer):
            self._line(part)
        self._buffer = ""


# Children of run_streaming still running, so a flow that is stopped (SIGTERM, Ctrl-C) ends
# them at once instead of waiting minutes for stages to finish (terminate_children).
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
# Seconds a stopped child's process group has to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 5.0
_STOPPING = threading.Event()


class StoppedError(RuntimeError):
    """The flow is being stopped: no new command starts."""


def stopping() -> bool:
    return _STOPPING.is_set()


def terminate_children(grace_s: float = TERMINATE_GRACE_S) -> int:
    """SIGTERM every running child's process group (DVC, the stage, its seed workers), then
    SIGKILL what is left after `grace_s`. Returns how many children were running."""
    with _RUNNING_LOCK:
        _STOPPING.set()  # nothing new starts from here on (a retry, a queued stage)
        procs = list(_RUNNING)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        if all(p.poll() is not None for p in procs):
            break
    return len(procs)


def run_streaming(
    args: Sequence[str],
    cwd: str | Path,
    on_line: Callable[[str], None],
    *,
    progress_interval: float = PROGRESS_LOG_INTERVAL_S,
    extra_env: dict[str, str] | None = None,
) -> CommandResult:
    """Run `args` in `cwd`, passing each output line (stdout and stderr) to `on_line`."""
    start = time.monotonic()
    splitter = _LineSplitter(on_line, progress_interval)
    with _RUNNING_LOCK:
        if _STOPPING.is_set():
            raise StoppedError("the flow is stopping; not started: " + " ".join(map(str, args)))
    with subprocess.Popen(
        list(args),
        cwd=cwd,
        env=child_env(extra_env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: terminate_children ends all of it
    ) as proc:
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(65536):
                splitter.feed(chunk)
            splitter.close()
            returncode = proc.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    return CommandResult(returncode, "\n".join(splitter.tail), time.monotonic() - start)


@dataclass(frozen=True)
class CapturedOutput:
    returncode: int
    stdout: str
    output_tail: str


def run_captured(args: Sequence[str], cwd: str | Path) -> CapturedOutput:
    """Run a short command, collecting its output (for DVC's machine-readable outputs)."""
    proc = subprocess.run(
        list(args), cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, check=False,
    )
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-ERROR_TAIL_LINES:])
    return CapturedOutput(proc.returncode, proc.stdout, tail)


def run_json(args: Sequence[str], cwd: str | Path) -> Any:
    """Run a DVC command with `--json` output and return the parsed JSON."""
    result = run_captured(args, cwd)
    if result.returncode != 0:
        raise DvcCommandError(args, result.returncode, result.output_tail)
    try:
        return json.loads(result.stdout or "{}")
    except json.JSONDecodeError as exc:
        raise DvcCommandError(args, result.returncode, f"output is not JSON: {result.stdout[:500]!r}") from exc
