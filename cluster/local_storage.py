"""A folder as storage: atomic writes, and conditional writes with hard links and file locks.

Every write goes to a temporary file beside its target (``.raytag-tmp-...``, never listed)
and is renamed over it, so a reader never sees a partial file. ``put_if_absent`` hard-links
a written temporary file to the key (``link`` fails when the name exists: one winner, on a
local disk and on NFS alike); ``replace_if`` compares and renames under an exclusive file
lock on a sidecar file, with an in-process lock first for this process's threads.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .digest import sha256_bytes
from .keys import LOCK_MARK, PREFLIGHT_MARK, TMP_MARK, check_key, check_prefix
from .storage import ConditionalWriteUnsupported, StorageError, Versioned


class LocalStorage:
    """A folder on a local (or shared network) file system.

    Writes are atomic: data goes to a temporary file in the target folder, then
    ``os.replace``. Failures raise StorageError naming the folder.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _fail(self, what: str, key: str, exc: OSError) -> StorageError:
        reason = exc.strerror or str(exc)
        return StorageError(f"cannot {what} {self.display(key)} in folder {self.uri}: {reason}")

    def display(self, key: str) -> str:
        """The absolute path of ``key`` as text."""
        return str(self.root / key) if key else self.uri

    def local_path(self, key: str) -> Path | None:
        """The real path of ``key`` (whether or not it exists)."""
        return self._path(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically (fsynced: manifests rely on it); raise StorageError."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_tmp(target, data)
            try:
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail("write", key, exc) from exc

    def put_file(self, key: str, path: Path) -> None:
        """Copy ``path`` to ``key`` atomically; a no-op when ``path`` already is that file."""
        target = self._path(key)
        if _same_file(Path(path), target):
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_copy(Path(path), target)
        except OSError as exc:
            raise self._fail("write", key, exc) from exc

    def get_bytes(self, key: str) -> bytes | None:
        """The content of ``key``, or None when it does not exist."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._fail("read", key, exc) from exc

    def get_file(self, key: str, path: Path) -> bool:
        """Copy ``key`` to ``path`` atomically; False when ``key`` does not exist."""
        source = self._path(key)
        if not source.is_file():
            return False
        if _same_file(source, Path(path)):
            return True
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _atomic_copy(source, Path(path))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._fail("read", key, exc) from exc
        return True

    def list_sizes(self, prefix: str) -> dict[str, int]:
        """Every file below folder ``prefix`` (recursive) as {key: size}; temporary files left out."""
        prefix = check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        found: dict[str, int] = {}
        if not base.is_dir():
            return found
        try:
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith(TMP_MARK):
                        continue
                    full = Path(dirpath) / name
                    try:
                        found[full.relative_to(self.root).as_posix()] = full.stat().st_size
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            raise self._fail("list", prefix, exc) from exc
        return dict(sorted(found.items()))

    def delete(self, key: str) -> None:
        """Delete one key; missing keys are fine."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail("delete", key, exc) from exc

    def delete_prefix(self, prefix: str) -> None:
        """Delete folder ``prefix`` and everything below it; a missing folder is fine."""
        prefix = check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        try:
            if prefix:
                shutil.rmtree(base, ignore_errors=False)
            else:
                for child in base.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._fail("delete", prefix, exc) from exc

    def exists(self, key: str) -> bool:
        """True when ``key`` is an existing file."""
        return self._path(key).is_file()

    def preflight(self, create_bucket: bool = False) -> None:
        """Create the folder if needed and check it is writable; raise StorageError if not.

        ``create_bucket`` is accepted for symmetry with S3Storage and ignored.
        """
        probe = f"{PREFLIGHT_MARK}{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / probe).write_bytes(b"ok")
            (self.root / probe).unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StorageError(f"cannot write to folder {self.uri}: {reason}") from exc

    def list(self, prefix: str) -> list[str]:
        """Every key below folder ``prefix`` (recursive), sorted."""
        return sorted(self.list_sizes(prefix))

    # -- conditional writes

    def get_versioned(self, key: str) -> Versioned | None:
        """The content of ``key`` and its sha256 (the version ``replace_if`` compares), or None."""
        data = self.get_bytes(key)
        return None if data is None else Versioned(data, sha256_bytes(data))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` with ``data`` unless it exists: its version, or None when it existed.

        The data is written (and fsynced) to a temporary file first, then hard-linked to the
        key: ``link`` fails when the name exists, so exactly one of racing writers wins, on a
        local disk and on NFS alike, and a reader never sees a partial file. Raises
        ConditionalWriteUnsupported on a file system without hard links, StorageError otherwise.
        """
        target = self._path(key)
        for attempt in range(3):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._write_tmp(target, data)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return None
                except OSError as exc:
                    if exc.errno in _NO_LINKS:
                        raise ConditionalWriteUnsupported(
                            f"folder {self.uri} cannot create {self.display(key)} atomically: "
                            f"the file system has no hard links ({exc.strerror})"
                        ) from exc
                    raise
                finally:
                    tmp.unlink(missing_ok=True)
                return sha256_bytes(data)
            except StorageError:
                raise
            except FileNotFoundError as exc:
                if attempt == 2:  # the folder vanished under us (another job deleting the run): again
                    raise self._fail("create", key, exc) from exc
            except OSError as exc:
                raise self._fail("create", key, exc) from exc
        raise AssertionError("unreachable")

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite ``key`` with ``data`` if its content's sha256 still is ``version``; else None.

        Compare-and-rename under an exclusive lock on a sidecar file of the folder
        (``.raytag-tmp-flock-<name>``, never listed): every ``replace_if`` of the key takes it,
        reads and compares the current file, then ``os.replace``s a fully written temporary
        file over it. The key never disappears in between, so ``put_if_absent`` (which needs
        no lock) cannot slip in. An in-process lock serialises this process's threads first:
        on NFS Linux emulates ``flock`` with byte-range locks, which do not exclude threads of
        one process. Raises ConditionalWriteUnsupported where the file system has no locks,
        StorageError otherwise.
        """
        target = self._path(key)
        sidecar = target.with_name(f"{LOCK_MARK}{target.name}")
        try:
            with _file_lock(sidecar, self.uri):
                try:
                    current = target.read_bytes()
                except FileNotFoundError:
                    return None
                if sha256_bytes(current) != version:
                    return None
                tmp = self._write_tmp(target, data)
                try:
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
        except StorageError:
            raise
        except OSError as exc:
            raise self._fail("replace", key, exc) from exc
        return sha256_bytes(data)

    @staticmethod
    def _write_tmp(target: Path, data: bytes) -> Path:
        """``data`` in a new fsynced temporary file beside ``target`` (the caller removes it)."""
        tmp = target.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{target.name}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp


_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
_NO_LOCKS = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextmanager
def _file_lock(path: Path, where: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) against other processes and threads.

    Raises ConditionalWriteUnsupported when the file system refuses file locks.
    """
    import fcntl

    with _thread_locks_guard:
        in_process = _thread_locks.setdefault(str(path), threading.Lock())
    with in_process:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno in _NO_LOCKS:
                    raise ConditionalWriteUnsupported(
                        f"folder {where} cannot lock {path.name} for a conditional write: "
                        f"the file system has no file locks ({exc.strerror})"
                    ) from exc
                raise
            yield  # closing the descriptor releases the lock
        finally:
            os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are the same existing file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file in target's folder."""
    tmp = target.with_name(f"{TMP_MARK}{uuid.uuid4().hex}-{target.name}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
