"""The data directory and the SQLite file: private to the user running Auditor.

They hold prompts and completions, token hashes and the admin token, so what Auditor creates is
created private (directory 0700, files 0600), whatever the umask. A directory or file that
already exists is the user's: its modes are left alone, with one warning if other users can
read it (say, a `.auditor/` made by an older version, 0755).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_SHARED_BITS = stat.S_IRWXG | stat.S_IRWXO

_warned: set[Path] = set()  # one warning per path and process: the URL is resolved often


def _warn_if_shared(path: Path, private_mode: int) -> None:
    # Any group or other bit: even 0711 lets others open a file whose name they know (auditor.db).
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & _SHARED_BITS and path not in _warned:
        _warned.add(path)
        log.warning("%s is open to other users (mode %04o) and holds prompts: chmod %o it", path, mode, private_mode)


def ensure_private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing (its missing parents get the usual modes: only this
    directory holds our data); an existing one is left as it is, with a warning if shared."""
    try:
        path.mkdir(mode=PRIVATE_DIR, parents=True)
    except FileExistsError:
        if path.is_dir():
            _warn_if_shared(path, PRIVATE_DIR)
        return path
    path.chmod(PRIVATE_DIR)  # mkdir's mode is cut by the umask; say it outright
    return path


def ensure_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists (then: warn if shared). An empty file
    is a valid SQLite database; SQLite gives the -wal and -shm files it creates beside it the
    database file's mode, so they are private too."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        _warn_if_shared(path, PRIVATE_FILE)
        return
    os.fchmod(descriptor, PRIVATE_FILE)
    os.close(descriptor)
