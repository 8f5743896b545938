"""Writing outputs without ever losing the user's data: guarded, locked, atomic, with the user's file modes.

Every directory or file quantkit writes goes through :func:`atomic_directory` or :func:`atomic_file`:

- the target is refused when it is, contains or lies inside a path the run reads (the model directory,
  a calibration directory), or when it is the current directory or one of its parents;
- an existing target is replaced only with ``overwrite`` and only when it is a previous quantkit
  output (a directory holding ``quantkit_report.json`` or ``calibration.json``, or a file the
  caller's ``is_previous`` recognises);
- one writer per target: an exclusive ``flock`` on the lock file ``.OUT.quantkit-lock`` beside it,
  which holds the writer's pid — a second run fails at once and names that pid. The kernel drops the lock of a
  killed process, so a stale lock file never blocks (the next run notes whose it was);
- the output is built in a hidden sibling ``.OUT.partial-<pid>`` and renamed into place only when
  everything succeeded. A directory is replaced by an atomic exchange (``renameat2(RENAME_EXCHANGE)``),
  so a crash leaves either the old or the new output; where the kernel or file system lacks it,
  two renames with the old copy parked at ``.OUT.old-<pid>``, which the next run restores;
- leftovers of killed runs (``.OUT.partial-<pid>``, ``.OUT.old-<pid>``, a lock whose pid is gone) are
  cleaned up by the next run on the same target, with a note;
- files get the mode the user's umask gives any new file (0644 under umask 022), directories 0755.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from quantkit.errors import EnvironmentFault, QuantkitError

REPORT_FILE = "quantkit_report.json"  # written into every `quantkit quantize` output directory
CALIBRATION_FILE = "calibration.json"  # written into every `quantkit calibrate` output directory
OUTPUT_MARKERS = (REPORT_FILE, CALIBRATION_FILE)

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def atomic_directory(out: str | Path, overwrite: bool = False, *, reads: Sequence[str | Path] = (),
                     notes: list[str] | None = None) -> AbstractContextManager[Path]:
    """A temporary directory that becomes ``out`` when the block exits without error (see the module doc)."""
    return _atomic(Path(out), overwrite, reads, notes, directory=True, is_previous=is_quantkit_directory)


def atomic_file(out: str | Path, overwrite: bool = False, *, is_previous: Callable[[Path], bool],
                reads: Sequence[str | Path] = (), notes: list[str] | None = None) -> AbstractContextManager[Path]:
    """A temporary file path that becomes ``out`` when the block exits without error.

    ``is_previous(out)`` says whether an existing ``out`` is a previous quantkit output of this kind.
    """
    return _atomic(Path(out), overwrite, reads, notes, directory=False, is_previous=is_previous)


def is_quantkit_directory(path: Path) -> bool:
    """Whether ``path`` is a directory quantkit wrote (it holds a quantize report or calibration metadata)."""
    return path.is_dir() and any((path / marker).is_file() for marker in OUTPUT_MARKERS)


def check_target(out: Path, reads: Sequence[str | Path] = ()) -> Path:
    """``out`` made absolute; refused when writing there could touch what the run reads or the working directory."""
    target = Path(os.path.abspath(out.expanduser()))
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise QuantkitError(f"refusing to write to {out}: it is the current directory or one of its parents; "
                            "choose a new directory for --out")
    for source in reads:
        source_path = Path(source).expanduser().resolve()
        if resolved == source_path or resolved.is_relative_to(source_path) or source_path.is_relative_to(resolved):
            raise QuantkitError(f"refusing to write to {out}: it is, contains or lies inside {source}, which this "
                                "run reads; choose an --out outside it")
    return target


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with a full disk or a missing permission as an :class:`EnvironmentFault`,
    and the metadata in sorted order (see :func:`_sort_metadata`)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        reason = re.sub(r"^Error while serializing: (I/O error: )?", "", str(exc)).strip()
        raise EnvironmentFault(f"cannot write {path.name} in {path.parent}: {reason}") from None
    if metadata is not None and len(metadata) > 1:
        _sort_metadata(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` of the safetensors file ``path`` with its keys sorted, in place.

    safetensors (0.8) serializes the metadata from a Rust ``HashMap``, in an order that changes from one
    save to the next (safetensors issue 584), so two identical saves differ in bytes. The sorted object
    has the same length; the header is left as it is unless it starts with the object as Python spells it.
    """
    with path.open("r+b") as file:
        size = int.from_bytes(file.read(8), "little")
        header = file.read(size)
        metadata = json.loads(header)["__metadata__"]
        written, canonical = (b'{"__metadata__":' + json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()
                              for m in (metadata, dict(sorted(metadata.items()))))
        if header.startswith(written) and written != canonical:
            file.seek(8)
            file.write(canonical)


def file_mode() -> int:
    """The mode a new file gets under the current umask (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def directory_mode() -> int:
    """The mode a new directory gets under the current umask (0o755 under umask 022)."""
    return 0o777 & ~_umask()


def apply_default_modes(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything below it) the modes new files and directories get."""
    files, dirs = file_mode(), directory_mode()
    if path.is_dir():
        path.chmod(dirs)
        for root, subdirs, names in os.walk(path):
            for name in subdirs:
                Path(root, name).chmod(dirs)
            for name in names:
                Path(root, name).chmod(files)
    else:
        path.chmod(files)


@contextmanager
def _atomic(out: Path, overwrite: bool, reads: Sequence[str | Path], notes: list[str] | None, *,
            directory: bool, is_previous: Callable[[Path], bool]) -> Iterator[Path]:
    target = check_target(out, reads)
    notes = notes if notes is not None else []
    created = _make_parents(target.parent)
    try:
        with _OutputLock(target, notes):
            _clean_leftovers(target, notes)
            _check_replaceable(out, target, overwrite, directory, is_previous)
            tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
            _remove(tmp)
            if directory:
                tmp.mkdir()
            try:
                yield tmp
                if tmp.exists():
                    apply_default_modes(tmp)
                _commit(tmp, target, directory)
            except BaseException:
                _remove(tmp)
                raise
    except BaseException:
        for parent in reversed(created):
            with suppress(OSError):
                parent.rmdir()
        raise


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing parents of the output (returned, outermost first, for removal on failure)."""
    missing = []
    for path in (parent, *parent.parents):
        if path.exists():
            break
        missing.append(path)
    missing.reverse()
    for path in missing:
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise _fault(f"cannot create directory {path}", exc) from None
    if not parent.is_dir():
        raise QuantkitError(f"cannot write into {parent}: it is not a directory")
    return missing


def _check_replaceable(out: Path, target: Path, overwrite: bool, directory: bool,
                       is_previous: Callable[[Path], bool]) -> None:
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise QuantkitError(f"output {out} already exists; pass --overwrite to replace it")
    if directory and not target.is_dir():
        raise QuantkitError(f"refusing to replace {out}: it is a file, not a quantkit output directory")
    if not directory and target.is_dir():
        raise QuantkitError(f"refusing to replace {out}: it is a directory, and this output is one file")
    if not is_previous(target):
        what = f"no {' or '.join(OUTPUT_MARKERS)} in it" if directory else "not written by quantkit"
        raise QuantkitError(f"refusing to replace {out}: it is not a quantkit output ({what}); "
                            "--overwrite only replaces a previous quantkit output")


def _commit(tmp: Path, target: Path, directory: bool) -> None:
    """Move the finished ``tmp`` to ``target``: a rename, or for an existing directory an atomic exchange."""
    try:
        if not (directory and target.is_dir() and not target.is_symlink()):
            os.replace(tmp, target)
            return
        if _exchange(tmp, target):
            _remove(tmp)  # now holds the previous output
            return
        parked = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, parked)
        os.replace(tmp, target)
        _remove(parked)
    except OSError as exc:
        raise _fault(f"cannot move the finished output into {target}", exc) from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False when the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _clean_leftovers(target: Path, notes: list[str]) -> None:
    """Remove what killed runs left beside ``target``; restore a parked previous output that lost its place.

    Called with the target's lock held: no live run is writing these, whatever pid their names carry.
    """
    # .OUT.partial-<pid>, .OUT.old-<pid>, and the GGUF writer's own temporary file inside a partial one
    pattern = re.compile(rf"(?P<writer>\.?)\.{re.escape(target.name)}\.(?P<kind>partial|old)-(?P<pid>\d+)"
                         r"(?P<suffix>\.[0-9a-f]+\.tmp)?")
    for leftover in sorted(target.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if match is None:
            continue
        whole = not (match["writer"] or match["suffix"])
        if match["kind"] == "old" and whole and not os.path.lexists(target):
            os.replace(leftover, target)
            notes.append(f"restored the previous output {target.name} from {leftover.name}, left by a killed run")
            continue
        _remove(leftover)
        notes.append(f"removed {leftover.name}, left in {target.parent} by a killed run (pid {match['pid']})")


class _OutputLock:
    """An exclusive lock on one output path: ``.NAME.quantkit-lock`` beside it, held with ``flock``, naming our pid."""

    def __init__(self, target: Path, notes: list[str]) -> None:
        self.target = target
        self.path = target.parent / f".{target.name}.quantkit-lock"
        self.notes = notes
        self.fd: int | None = None

    def __enter__(self) -> _OutputLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            except OSError as exc:
                raise _fault(f"cannot create the lock file {self.path}", exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise QuantkitError(
                    f"another quantkit run (pid {holder}) is writing {self.target}; "
                    "wait for it to finish or choose another --out"
                ) from None
            if _same_file(fd, self.path):  # not unlinked by the previous holder between our open and flock
                break
            os.close(fd)
        previous = os.read(fd, 32).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):  # its holder died without releasing it (SIGKILL, power loss)
            self.notes.append(f"took over the lock {self.path.name} of pid {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        with suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fault(what: str, exc: OSError) -> EnvironmentFault:
    return EnvironmentFault(f"{what}: {exc.strerror or exc}")
