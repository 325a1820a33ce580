"""One training process per run: an exclusive lock on the run's name, so two `make train` of the
same run cannot both write its checkpoints. Standard library only (cheap to import).
"""

from __future__ import annotations

import atexit
import fcntl
import os
from pathlib import Path

from app.errors import UserError

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
_held: set[Path] = set()  # lock files this process holds (a second flock of its own would refuse it)


def lock_run(root: Path, name: str) -> None:
    """One process trains a run at a time: an exclusive `flock` on `<root>/.<name>.lock`, held until
    this process exits (the kernel releases it even on kill -9; a normal exit also removes the
    file). UserError naming the holder's PID if another process has it.

    NOTE: only the launching process locks: the processes a launcher starts for the other ranks
    (Lightning re-runs the command with LOCAL_RANK set; torchrun, SLURM) are part of its run. The
    lock sits beside the run's folder, not in it, so run.resume=false can rename the folder.
    """
    if any(os.environ.get(var, "0") != "0" for var in _RANK_VARIABLES):
        return
    path = lock_file(root, name)
    if path.absolute() in _held:
        return
    created = [p for p in (root, *root.parents) if not p.exists()]
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write in the runs folder {root} ({err.strerror}): choose a writable run.root") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"run {name} is being trained by another process (PID {holder}, lock {path}): "
                            "wait for it to finish or stop it, or give this run another run.name") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file as it exited: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held.add(path.absolute())
    atexit.register(_unlock, fd, path, created)


def lock_file(root: Path, name: str) -> Path:
    """The lock of run `name` under `root`: beside the run's folder, not in it."""
    return root / f".{name}.lock"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _unlock(fd: int, path: Path, created: list[Path]) -> None:
    """Remove the lock file while still holding it (a process that opened it meanwhile then finds
    it gone and retries), then the folders the lock created if they stayed empty."""
    if _same_file(fd, path):
        path.unlink(missing_ok=True)
    os.close(fd)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break
