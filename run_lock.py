"""One run per output folder: train.py locks its --output_dir before it writes anything there, and holds the lock
to its end (report and upload included). A second run on a locked folder ends at once, naming the process that holds
it, and writes nothing.

The lock is an flock on LOCK_FILE in the folder, and the kernel releases it when its process ends, however it ends: a
lock file left by a run that was killed (kill -9, a crash) is not locked any more, so `--resume` takes it over. The
holder writes its PID, machine and start time into the file, for the message a second run prints. We chose flock over
a PID file checked with `os.kill(pid, 0)`, which has to judge when a lock is stale and can judge wrong: a PID reused by
another process after a reboot, a PID on another machine of a shared filesystem, two runs that find the same stale
file at once. Under torchrun or accelerate launch only the main process takes the lock, as only it writes the folder
(model_utils.is_main_process); the ranks of one launch share it. Where the filesystem has no flock (some network
mounts), the run goes on with a warning.
"""

import contextlib
import datetime
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

from checkpoint_utils import CheckpointError, check_writable

logger = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path, take: bool = True):
    """`with output_dir_lock(dir):` the rest of the run; a CheckpointError (nothing written) when another run holds
    the folder. The folder is created for the lock, and removed again if the run leaves it empty. `take=False` (the
    other processes of a multi-process launch): no lock."""
    if not take:
        yield
        return
    folder = Path(output_dir)
    check_writable(folder)  # one clear line when the folder cannot be made, before anything is created
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        fd = take_lock(folder / LOCK_FILE)
        yield
    finally:
        if fd is not None:
            # Removed before it is unlocked: the next run locks a new file, never this removed one (take_lock).
            (folder / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)
        for empty in reversed(created):  # a run that ended before writing anything leaves no folder behind
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                empty.rmdir()


def take_lock(path: Path) -> int | None:
    """The locked file's descriptor, with this process written in it; None where the filesystem cannot lock."""
    if fcntl is None:
        logger.warning("No file locks on this system: nothing stops a second run on %s at the same time.", path.parent)
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise CheckpointError(in_use_message(path.parent, holder)) from None
        except OSError as e:  # a filesystem without flock
            os.close(fd)
            logger.warning(
                "Cannot lock %s (%s): nothing stops a second run on it at the same time.", path.parent, e.strerror
            )
            return None
        # The run that held it may have removed the file between our open and our lock: then lock the file there now.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    previous = read_holder(fd)
    if previous:
        logger.info(
            "%s: the run of PID %s (started %s) ended without releasing the folder (killed?); this run takes it.",
            path.parent,
            previous.get("pid"),
            previous.get("started"),
        )
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def read_holder(fd: int) -> dict:
    """What the holder of a lock file wrote about itself; {} when it has not written it yet (or it is unreadable)."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def in_use_message(folder: Path, holder: dict) -> str:
    if not holder:
        who = "another run of train.py (it is starting: its PID is not written yet)"
    else:
        here = holder.get("host") == socket.gethostname()
        command = str(holder.get("command", ""))
        who = (
            f"another run of train.py: PID {holder.get('pid')} "
            + ("on this machine" if here else f"on the machine {holder.get('host')}")
            + f", started {holder.get('started')}"
            + (f" ({command[:100]}{'...' if len(command) > 100 else ''})" if command else "")
        )
    return f"{folder} is in use by {who}; wait for it to end or stop it, or choose another --output_dir."
