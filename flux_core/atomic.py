"""Files and folders written atomically: built beside their target, renamed into place when complete.

A command's outputs form a FileSet: all renamed into place at the end, or none.

Every output of the project goes through these (weight files, text-encoder folders, PNGs, notebooks,
benchmark JSON, training checkpoints): a failure or a kill part-way leaves the old target untouched and no half-written
one, because os.replace within one folder is atomic on POSIX and Windows.
"""

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_to_overwrite(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} already exists and is not empty; pass overwrite=True to replace it")


@contextmanager
def atomic_folder(folder: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `folder` to fill; on success it becomes `folder` by rename.

    A non-empty `folder` is refused (FileExistsError) unless overwrite=True, checked before and after
    the work; on any error the temporary folder is removed and `folder` is untouched.
    """
    folder = Path(folder)
    _refuse_to_overwrite(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        _refuse_to_overwrite(folder, overwrite)  # it may have appeared while we worked
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already on success


def replace_folder(built: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Move the finished folder `built` to `folder` (same file system), replacing what is there.

    An existing folder is moved aside first (rename cannot replace a non-empty folder) and removed
    only once the new one is in place, so `folder` is at every moment the old or the new one whole.
    """
    built, folder = Path(built), Path(folder)
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old)
        os.replace(built, folder)
        shutil.rmtree(old)
    else:
        os.replace(built, folder)


def make_readable(folder: str | os.PathLike) -> None:
    """Give a folder and everything in it an ordinary mode (0777 / 0666 minus the umask).

    Temporary folders and files are private to their creator; a folder built in one and installed
    for others (package data, a shared test checkpoint) would stay unreadable to them otherwise.
    """
    folder = Path(folder)
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


class FileSet:
    """Files written as a set, all or nothing: each to a temporary file beside its target, and all
    renamed into place only by `commit()`.

        with FileSet() as outputs:
            with outputs.file("out/a.png") as f: ...
            with outputs.file("out/b.png") as f: ...
        # here both exist, or (on any error, or a SIGTERM turned into an exception) neither was written

    The renames run with SIGTERM held back (delivered right after), so a kill by SIGTERM leaves the
    complete set or nothing; only SIGKILL can leave a temporary file (hidden: `.NAME.XXXX.tmp`).
    """

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []  # (temporary, target)

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    @contextmanager
    def file(self, path: str | os.PathLike, mode: str = "wb"):
        """An open temporary file for `path`; it joins the set once written without error."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"cannot write {path}: a folder of that name is in the way")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, mode) as f:
                yield f
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.pending.append((Path(tmp), path))

    def discard(self) -> None:
        """Remove every temporary file of the set; nothing was renamed into place."""
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []

    def commit(self) -> list[Path]:
        """Rename every file into place (SIGTERM held until done); on a failure, remove the ones
        already renamed and the remaining temporaries, then raise."""
        in_the_way = [target for _, target in self.pending if target.is_dir()]
        if in_the_way:
            self.discard()
            raise IsADirectoryError(f"cannot write {in_the_way[0]}: a folder of that name is in the way")
        done: list[Path] = []
        blocked = _hold_sigterm()
        try:
            for tmp, target in self.pending:
                os.replace(tmp, target)
                done.append(target)
        except BaseException:
            for target in done:
                target.unlink(missing_ok=True)
            self.discard()
            raise
        finally:
            _release_sigterm(blocked)
        self.pending = []
        return done


def _hold_sigterm() -> bool:
    """Block SIGTERM for this thread (main thread, POSIX); True if it was blocked here."""
    if not hasattr(signal, "pthread_sigmask"):
        return False
    return signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _release_sigterm(blocked_here: bool) -> None:
    if blocked_here:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; on success it replaces `path` (with an
    ordinary file's mode: 0666 minus the umask), on any error it is removed and `path` is untouched.
    A FileSet of one file."""
    with FileSet() as files, files.file(path, mode) as f:
        yield f
