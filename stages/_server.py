"""The stage server (opt-in speed mode, CMKD_STAGE_SERVER=1): stages forked from a warm process.

Every stage is its own process (DVC runs `python -m stages <name> ...`), and importing torch,
torchmetrics and torch._dynamo (which every optimizer imports) costs seconds of CPU per
process. With CMKD_STAGE_SERVER=1 the first stage of a run starts this server in the
background (and runs itself as usual); the next ones hand their command to it. The server
holds those third-party libraries imported and forks one child per stage; the child takes over
the client's stdin/stdout/stderr (passed over the socket), working directory, environment,
umask and arguments, runs `stages.<name>` as `__main__` and reports its exit status. The
client waits for it, forwards SIGINT/SIGTERM/SIGHUP to it, and if the client itself is killed
the child kills itself.

Off by default, because a forked child is not a process of its own in every respect: it keeps
the server's resource limits (ulimit), CPU affinity, niceness, session and controlling terminal
(so `nohup`, `taskset`, `nice`, `ulimit` on the command have no effect on it), environment read
at import time by the preloaded libraries (TQDM_DISABLE, TMPDIR, ...) is the server's, and
`/usr/bin/time -v` measures the thin client only. What it guarantees: fresh code (the server
never imports `cmkd` or `stages`; every child imports its checkout's), fresh libraries (the
socket is keyed by every preloaded package's files and by this file itself, and the server
re-checks the files of every module it holds before each fork and exits when one changed),
the client's exit status, signals and file descriptors.

Never imported by the server: cmkd and stages themselves, and anything that starts threads or
an OpenMP team (the server sets one intra-op thread and computes nothing, so forking is safe).
One server per user, interpreter, library files and thread-related environment; it exits
after CMKD_STAGE_SERVER_IDLE seconds (default 120) without a stage. Linux only.

    python stages/_server.py serve SOCKET      (started by the client, not by hand)
    python stages/_server.py stop              stop this environment's server
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time

IDLE_SECONDS = float(os.environ.get("CMKD_STAGE_SERVER_IDLE", "120"))
# Third-party modules the stages import; importing them is the start-up cost the server saves.
PRELOAD = ("numpy", "scipy.stats", "sklearn.datasets", "h5py", "yaml", "tqdm.auto", "PIL.Image", "torch", "torch.nn",
           "torch._dynamo", "torch.optim", "torch.distributed", "torchmetrics", "torchmetrics.classification",
           "dvclive", "matplotlib", "matplotlib.pyplot")
# Environment read when those libraries are imported or the process starts: a server imported
# under other values must not serve this client.
_ENV_PREFIXES = ("OMP_", "MKL_", "ATEN_", "ONEDNN_", "CMKD_CPU", "KMP_", "OPENBLAS_", "CUDA_", "TORCH", "PYTORCH", "PYTHON", "LD_", "MPL", "HDF5_", "NUMEXPR_")
_STATUS = struct.Struct("!i")
_PID = struct.Struct("!q")


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("CMKD_STAGE_SERVER", "0").strip().lower() in ("1", "true", "yes", "on")


def socket_dir() -> str | None:
    """A directory only this user can enter (the socket runs code as this user), else None."""
    path = os.environ.get("CMKD_STAGE_SERVER_DIR") or os.path.join("/tmp", f"cmkd-stage-server-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def _top_level(names) -> list[str]:
    return sorted({name.split(".")[0] for name in names})


def _stat(path: str | None) -> list | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def _library_stamp() -> list:
    """What identifies the libraries a server would preload, without importing them: each
    package's __init__ and folder (a reinstall replaces files: new inodes, a new folder mtime)
    and this file's content (an edited server is a new server)."""
    import importlib.util

    with open(os.path.abspath(__file__), "rb") as f:
        stamp = [["_server", hashlib.sha256(f.read()).hexdigest()]]  # by content: checkouts share
    for name in _top_level(PRELOAD):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec else None
        stamp.append([name, origin, _stat(origin), _stat(os.path.dirname(origin) if origin else None)])
    return stamp


def _loaded_files() -> dict[str, list | None]:
    """Every module file the server holds, with its stat: checked again before each fork."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path:
            files[path] = _stat(path)
    return files


def _changed(files: dict[str, list | None]) -> str | None:
    for path, stamp in files.items():
        if _stat(path) != stamp:
            return path
    return None


def socket_path() -> str | None:
    folder = socket_dir()
    if folder is None:
        return None
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    key = json.dumps([sys.executable, sys.version, _library_stamp(), env])
    return os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:16] + ".sock")


# --------------------------------------------------------------------------- client


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return data


def start_server(path: str) -> None:
    """Start a server for `path` in the background, detached (unless one is starting already)."""
    import fcntl

    lock = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return  # another client is starting it
    # The server keeps the lock while it starts, then releases it once it listens.
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", path], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(lock,),
                     env={**os.environ, "CMKD_STAGE_SERVER_LOCK_FD": str(lock)}, start_new_session=True, close_fds=True)
    os.close(lock)


def delegate(module: str, argv: list[str]) -> int | None:
    """Run `module` in the server; its exit status, or None when no server could take it (the
    caller then runs the stage itself, and a server is started for the next stages)."""
    if not enabled():
        return None
    path = socket_path()
    if path is None:
        return None
    sock = _connect(path)
    if sock is None:
        if os.path.exists(path):
            try:
                os.unlink(path)  # a server that died without cleaning up
            except OSError:
                pass
        start_server(path)
        return None
    with sock:
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps({"module": module, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "umask": umask}).encode()
        try:
            socket.send_fds(sock, [struct.pack("!q", len(request)) + request], [0, 1, 2])
        except OSError:
            return None
        pid_bytes = _recv_exact(sock, _PID.size)
        if pid_bytes is None:
            return None  # the server went away before starting the stage
        (pid,) = _PID.unpack(pid_bytes)
        if os.environ.get("CMKD_LOG_LEVEL", "").upper() == "DEBUG":
            print(f"DEBUG stages: {module} runs in the stage server as pid {pid}", file=sys.stderr, flush=True)
        import signal

        def forward(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)
        status = _recv_exact(sock, _STATUS.size)
        if status is None:  # the server itself went away
            print(f"error: stage process {pid} ended without an exit status", file=sys.stderr)
            return 1
        return _STATUS.unpack(status)[0]


# --------------------------------------------------------------------------- server


def _preload() -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import importlib

    import torch

    torch.set_num_threads(1)  # never start an OpenMP team in a process that forks
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    # Optimizers import torch._dynamo lazily on first construction; do it here once.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(conn: socket.socket) -> None:
    """In the forked child: become the client's stage process, run the stage, report, exit."""
    import atexit
    import io
    import runpy
    import signal
    import threading
    import traceback

    code = 1
    try:
        header, fds, _, _ = socket.recv_fds(conn, 8, 3)
        rest = _recv_exact(conn, 8 - len(header)) if 0 < len(header) < 8 else b""
        if len(fds) != 3 or rest is None:
            os._exit(1)
        (size,) = struct.unpack("!q", header + rest)
        body = _recv_exact(conn, size)
        if body is None:
            os._exit(1)
        req = json.loads(body)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.umask(req["umask"])
        interactive = os.isatty(1)
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=interactive,
                                      write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=unbuffered)
        sys.path.insert(0, req["cwd"])  # as `python -m` from the client's directory
        atexit._clear()  # the server's exit handlers are not the stage's
        conn.sendall(_PID.pack(os.getpid()))

        def die_with_client() -> None:
            try:
                while conn.recv(1):
                    pass
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=die_with_client, daemon=True).start()
        sys.argv = [req["module"], *req["argv"]]
        try:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        # What the interpreter does at exit: wait for non-daemon threads, run exit handlers.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        try:
            conn.sendall(_STATUS.pack(code))
        except OSError:
            pass
        os._exit(code)


def serve(path: str) -> None:
    import select
    import signal

    _preload()
    tmp = f"{path}.{os.getpid()}.tmp"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(tmp)
    listener.listen(64)
    os.replace(tmp, path)  # clients see a listening socket or none
    ino = os.stat(path).st_ino
    lock_fd = os.environ.pop("CMKD_STAGE_SERVER_LOCK_FD", None)
    if lock_fd:
        os.close(int(lock_fd))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    loaded = _loaded_files()
    # Each child's connection stays open here until the child is reaped: a child killed by a
    # signal cannot report, so the server sends 128 + signal for it (as a shell would).
    children: dict[int, socket.socket] = {}
    last = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([listener], [], [], 0.2)
            for pid, conn in list(children.items()):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if done:
                    if os.WIFSIGNALED(status):
                        try:
                            conn.sendall(_STATUS.pack(128 + os.WTERMSIG(status)))
                        except OSError:
                            pass
                    conn.close()
                    del children[pid]
            if ready:
                conn, _ = listener.accept()
                if _changed(loaded) is not None:
                    # A library was upgraded (or this file edited) under the server: the
                    # client gets no PID, runs the stage itself, and starts a fresh server.
                    conn.close()
                    break
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other in children.values():
                        other.close()
                    _child(conn)
                children[pid] = conn
                last = time.monotonic()
            elif not children and time.monotonic() - last > IDLE_SECONDS:
                break
            try:
                if os.stat(path).st_ino != ino:
                    break  # replaced by a newer server
            except FileNotFoundError:
                break  # stopped
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == ino:
                os.unlink(path)
        except OSError:
            pass
        try:
            os.unlink(path + ".lock")  # the start lock: one per key, gone with its server
        except OSError:
            pass


def stop() -> bool:
    """Stop this environment's server, if one runs; True if one was stopped."""
    path = socket_path()
    if path is None or not os.path.exists(path):
        return False
    os.unlink(path)  # the server notices within a second and exits once its stages end
    return True


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        sys.path.pop(0)  # this file's folder: the server must not import stages/ or cmkd/
        serve(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "stop":
        print("stopped" if stop() else "no server running")
    else:
        sys.exit(__doc__)
