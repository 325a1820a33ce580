"""A fork server for `python -m pipelines`: pay the imports (Lightning, torchmetrics, MLflow) once,
then answer each request with a forked child that behaves as a fresh `python -m pipelines` would.

    python tests/pipelines/scripts/cli_zygote.py        (the environment of TrainJob.env())

Protocol, one JSON object per line: it prints {"ready": true, "pid": ...} once the jobs are
imported, then reads requests on stdin

    {"cwd": ..., "argv": [...], "stdout": path, "stderr": path, "timeout": seconds, "module": "pipelines"}

and answers each with {"returncode": ..., "timed_out": ...} (returncode -N: killed by signal N,
as subprocess reports it) once the child has ended. EOF on stdin: it exits 0.

The child is made to look like a fresh process to the job: fd 0 is /dev/null, fd 1 and 2 are the
two files (so output written below Python lands there too), cwd, sys.argv and sys.path[0] are
what `python -m` sets, and the module runs through runpy._run_module_as_main, the function
`python -m` itself calls. It then leaves through the interpreter's normal exit (SystemExit), so
non-daemon threads are joined, atexit handlers run (the run lock removes its file in one) and the
std streams are flushed, in the order a real process does. An uncaught exception is printed by
sys.excepthook without this file's frames, exit code 1, as the interpreter would. One difference:
the objects made by the imports are frozen (gc.freeze), so the exit does not collect the garbage
cycles among them; the job's own objects are collected as usual.

Everything the zygote itself would print (a warning at import, a stray print) goes to its own
stderr, which its user checks is empty: output printed at import time would otherwise be missing
from every case.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import select
import signal
import sys
import time
from typing import IO

# What the jobs import: a child imports anything else itself, as a real process would. Not
# pipelines.__main__: `python -m` runs it as __main__ and warns if it was imported before.
PRELOAD = ("pipelines.info", "pipelines.train", "pipelines.eval", "pipelines.compare", "pipelines.sync")
# Threads of imported libraries that a fork does not upset: the background thread of pyarrow's
# bundled jemalloc (imported by MLflow), whose pthread_atfork handlers hold its locks over the fork.
FORK_SAFE_THREADS = {"jemalloc_bg_thd"}
THREAD_NAMED_WITHIN_S = 2
KILL_GRACE_S = 5  # after SIGTERM at the timeout, before SIGKILL


def serve() -> tuple[dict, list[IO]] | None:
    """The zygote's loop. Returns (request, the protocol's files) in a forked child, None at EOF."""
    # The protocol gets its own fds; fd 0 becomes /dev/null and fd 1 the zygote's stderr, so that
    # sys.stdin/sys.stdout (wrapping fds 0 and 1, as in any process) never touch the protocol.
    requests_fd, answers_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    requests, answers = os.fdopen(requests_fd, "r"), os.fdopen(answers_fd, "w")

    sys.path[0] = os.getcwd()  # `python -m` puts the working folder first, not this script's folder
    for name in PRELOAD:
        importlib.import_module(name)
    # The imported objects move to GC's permanent generation: a child's collections and exit then
    # leave them alone instead of touching (and copying) the whole heap, which made each child's
    # exit take ~2 s instead of ~0.4 s.
    gc.collect()
    gc.freeze()
    # A fork copies only the calling thread: a lock another thread held would never be released.
    for _ in range(THREAD_NAMED_WITHIN_S * 20):  # a new thread bears its creator's name until it renames itself
        if not (others := [name for name in _thread_names()[1:] if name not in FORK_SAFE_THREADS]):
            break
        time.sleep(0.05)
    else:
        print(f"cli_zygote: threads {others} run after the imports: forking is not safe", file=sys.stderr)
    answers.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    answers.flush()

    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()  # nothing buffered may be copied into the child
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request, [requests, answers]
        try:
            os.setpgid(pid, pid)  # also done by the child: in its own group before either goes on
        except OSError:  # it has already exited, or set it itself
            pass
        returncode, timed_out = wait(pid, request.get("timeout", 60))
        answers.write(json.dumps({"returncode": returncode, "timed_out": timed_out}) + "\n")
        answers.flush()
    return None


def _thread_names() -> list[str]:
    """The names of this process's OS threads, the main thread first."""
    tasks = sorted(os.listdir("/proc/self/task"), key=lambda tid: (int(tid) != os.getpid(), int(tid)))
    names = []
    for tid in tasks:
        with open(f"/proc/self/task/{tid}/comm") as comm:
            names.append(comm.read().strip())
    return names


def wait(pid: int, timeout: float) -> tuple[int, bool]:
    """The child's exit code (subprocess's convention), killing its process group at the timeout."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        timed_out = not ready
        if timed_out:
            for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                if select.select([pidfd], [], [], grace)[0]:
                    break
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(status), timed_out


def run_case(request: dict, protocol: list[IO]) -> None:
    """In the child: become `python -m <module> <argv>` in `cwd`, writing to the two files."""
    os.setpgid(0, 0)  # its own process group: the timeout kills whatever it started too
    for file in protocol:
        file.close()  # as objects, not fds: their finalizers would close a reused fd number at exit
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    sys.path[0] = os.getcwd()
    module = request.get("module", "pipelines")
    sys.argv = ["-m", *request["argv"]]  # what the interpreter sets before runpy replaces argv[0]
    # The module runs in this file's namespace (__main__), as `python -m` runs it in the __main__
    # module, and may rebind its names: what follows uses local ones.
    _sys, _os, _signal, run_module_as_main = sys, os, signal, runpy._run_module_as_main
    try:
        run_module_as_main(module)  # what `python -m` runs; argv[0] becomes the module's file
    except SystemExit:
        raise  # the interpreter's own handling: the exit code, or a message and exit 1
    except BaseException as err:  # noqa: BLE001 - printed as the interpreter prints it
        # Drop this function's frame: the traceback starts at runpy, as a real process's does.
        err.__traceback__ = err.__traceback__.tb_next
        _sys.excepthook(type(err), err, err.__traceback__)
        if isinstance(err, KeyboardInterrupt):  # the interpreter dies of SIGINT (exit -2), though after atexit
            _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
            _os.kill(_os.getpid(), _signal.SIGINT)
        _sys.exit(1)
    _sys.exit(0)


if __name__ == "__main__":
    served = serve()
    if served is not None:
        run_case(*served)
