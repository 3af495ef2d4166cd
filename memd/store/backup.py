"""Database safety (SPEC §5): online backups, checks, and the swap half of recovery.

* :func:`backup_database` — an online copy through SQLite's backup API (consistent while the
  daemon writes), ``<db>.backup-<UTC time>``, 0600; the newest :data:`BACKUPS_KEPT` are kept.
  Taken at most once a day (:func:`backup_if_due`) and before every migration.
* :func:`check_database` — ``PRAGMA quick_check`` (or ``integrity_check``); a file that is not a
  database at all counts as damaged.
* :func:`restore_newest_backup` — moves the damaged file (and its ``-wal``/``-shm``) aside as
  ``<db>.damaged-<UTC time>`` (kept for inspection) and copies the newest backup that passes the
  check into place. Reconciling the restored state with the memory files on disk is the caller's
  second step (:mod:`memd.memory.recover`, wired by ``memd db recover``).

Synchronous (stdlib ``sqlite3``): callers run it in a thread.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

#: Backups kept per database.
BACKUPS_KEPT = 2
#: A daily backup is due when the newest is older than this, seconds.
BACKUP_INTERVAL_S = 24 * 3600.0
FILE_MODE = 0o600
_STAMP = "%Y%m%dT%H%M%SZ"
#: Words of SQLite errors that mean the file is damaged (not merely busy).
DAMAGE_MARKERS = ("malformed", "not a database", "disk image", "file is encrypted", "corrupt")


def is_damage(exc: BaseException) -> bool:
    """Whether an error says the database file is damaged (``database disk image is malformed``,
    ``file is not a database``, ...), as opposed to locked or full."""
    text = str(exc).lower()
    return any(marker in text for marker in DAMAGE_MARKERS)


def _stamp(now_s: float) -> str:
    return time.strftime(_STAMP, time.gmtime(now_s))


def backups(db_path: Path) -> list[Path]:
    """The backups of ``db_path``, newest first."""
    db_path = Path(db_path)
    found = [p for p in db_path.parent.glob(f"{db_path.name}.backup-*") if not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: p.name, reverse=True)


def check_database(db_path: Path, *, full: bool = False) -> list[str]:
    """Check a database file.

    Args:
        db_path: the file.
        full: ``integrity_check`` (slower, every index) instead of ``quick_check``.

    Returns:
        The problems found; empty when the file is sound (a missing file is sound: memd creates it).
    """
    db_path = Path(db_path)
    if not db_path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        return [str(exc)]
    try:
        rows = conn.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        conn.close()
    problems = [str(r[0]) for r in rows]
    return [] if problems == ["ok"] else problems


def backup_database(db_path: Path, *, now_s: float | None = None) -> Path:
    """Take an online backup of ``db_path`` (SQLite backup API), 0600, and prune old ones.

    Returns:
        The new backup file.

    Raises:
        sqlite3.Error / OSError: the database cannot be read or the copy cannot be written.
    """
    db_path = Path(db_path)
    now_s = time.time() if now_s is None else now_s
    final = db_path.with_name(f"{db_path.name}.backup-{_stamp(now_s)}")
    temp = final.with_name(final.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.close(fd)
    os.chmod(temp, FILE_MODE)
    src = sqlite3.connect(db_path, timeout=30.0)
    try:
        dst = sqlite3.connect(temp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    os.replace(temp, final)
    for old in backups(db_path)[BACKUPS_KEPT:]:
        old.unlink(missing_ok=True)
    return final


def backup_if_due(db_path: Path, *, now_s: float | None = None) -> Path | None:
    """Back up ``db_path`` when the newest backup is older than :data:`BACKUP_INTERVAL_S` (or there
    is none) and the database exists. Returns the new backup, or ``None`` when none was due."""
    db_path = Path(db_path)
    now_s = time.time() if now_s is None else now_s
    if not db_path.exists():
        return None
    newest = backups(db_path)
    if newest and now_s - newest[0].stat().st_mtime < BACKUP_INTERVAL_S:
        return None
    return backup_database(db_path, now_s=now_s)


@dataclass(frozen=True, slots=True)
class Restored:
    """What :func:`restore_newest_backup` did.

    Attributes:
        damaged: where the damaged file was moved (``None`` when there was none).
        backup: the backup put in place (``None``: no good backup; the next start creates an
            empty database, rebuilt from the rollouts and the memory files).
        skipped: backups that failed the check, newest first.
    """

    damaged: Path | None
    backup: Path | None
    skipped: tuple[Path, ...]


def restore_newest_backup(db_path: Path, *, now_s: float | None = None) -> Restored:
    """Move the (damaged) database aside and put the newest good backup in its place.

    Raises:
        OSError: a file cannot be moved or copied (nothing is deleted either way).
    """
    db_path = Path(db_path)
    now_s = time.time() if now_s is None else now_s
    damaged = None
    if db_path.exists():
        damaged = db_path.with_name(f"{db_path.name}.damaged-{_stamp(now_s)}")
        os.replace(db_path, damaged)
    for suffix in ("-wal", "-shm"):
        side = db_path.with_name(db_path.name + suffix)
        if side.exists():
            if damaged is not None:
                os.replace(side, damaged.with_name(damaged.name + suffix))
            else:
                side.unlink()
    skipped: list[Path] = []
    for candidate in backups(db_path):
        if check_database(candidate):
            skipped.append(candidate)
            continue
        temp = db_path.with_name(db_path.name + ".restoring")
        shutil.copyfile(candidate, temp)
        os.chmod(temp, FILE_MODE)
        os.replace(temp, db_path)
        return Restored(damaged, candidate, tuple(skipped))
    return Restored(damaged, None, tuple(skipped))
