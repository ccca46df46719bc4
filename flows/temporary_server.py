"""Stop the temporary Prefect server when a flow process is terminated (SIGTERM, SIGHUP).

Without PREFECT_API_URL, Prefect starts a temporary ("ephemeral") API server for the run: a
`uvicorn` child process (prefect.server.api.server.SubprocessASGIServer), stopped only by an
`atexit` handler. On SIGTERM, Prefect's flow engine (`capture_sigterm`) raises
TerminationSignal, lets the flow end its stages and record the run as crashed, then restores
the SIGTERM handler that was installed before the flow and sends SIGTERM again, so that this
previous handler runs too. With the default handler the interpreter dies at once, without
`atexit`, and the server is left running forever. So `main()` installs the handler below as
that previous handler: it stops the server (and waits for its process to exit), then dies of
the signal with the default action, keeping the exit status of a process killed by SIGTERM.

SIGHUP (a closed terminal) is handled as SIGTERM: the same path ends the stages too. Ctrl-C
(SIGINT) needs nothing here: Python raises KeyboardInterrupt, the flow ends its stages, and
the interpreter exits normally, running Prefect's `atexit` stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator


def stop_temporary_server() -> bool:
    """Stop the temporary Prefect server this process started, if any; True if one was running.

    A real server (PREFECT_API_URL set) is never touched: Prefect starts no temporary one then.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return False
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:  # never imported: no temporary server was started
        return False
    # The instance Prefect's clients start (no port given); SubprocessASGIServer is a per-port
    # singleton, so this is the very server of this process.
    server = server_module.SubprocessASGIServer()
    if server.server_process is None:
        return False
    server.stop()  # SIGTERM, SIGKILL after 5 s; waits for the process to exit
    return True


def _stop_server_then_die(signum: int, frame: object) -> None:
    stop_temporary_server()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _hangup_as_sigterm(signum: int, frame: object) -> None:
    # Whatever handles SIGTERM now: Prefect's bridge during the flow, else _stop_server_then_die.
    signal.raise_signal(signal.SIGTERM)


@contextlib.contextmanager
def stop_temporary_server_on_termination() -> Iterator[None]:
    """While the flow runs (main() only), SIGTERM/SIGHUP also stop the temporary Prefect server.

    A signal whose handler is not the default (e.g. SIGHUP ignored under `nohup`, or a handler
    set by whoever runs us) is left alone. Handlers are restored on exit.
    """
    handlers = {signal.SIGTERM: _stop_server_then_die, signal.SIGHUP: _hangup_as_sigterm}
    previous = {}
    try:
        for signum, handler in handlers.items():
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
