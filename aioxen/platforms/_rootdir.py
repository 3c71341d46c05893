"""Private root directories: open, create and check ``$XEN_ROOT`` and what lies under it.

Theory of operation
-------------------
On the ``unix`` platform every process that can open the files under the root can play any
domain: read and write every grant, bind every port, talk to xenstored as dom0.  The root's
permissions are therefore the whole security boundary, and this module is the one place that
decides whether a directory may serve as one.  A directory is *private* if

* it is a real directory -- the last component is opened with ``O_NOFOLLOW | O_DIRECTORY``
  and checked with ``fstat`` on that descriptor, so a symbolic link is never followed, not
  even to a directory we own;
* it is owned by the effective uid;
* its mode grants nothing to group or other (``mode & 0o077 == 0``).

Anything else raises [`RootPermissionError`][] (a `PermissionError`) whose message
names the path, its owner (uid and name) and mode, and the fix (``chmod 700 DIR``, or choose
a directory of your own).  Nothing is ever repaired silently: a root that was 0777 for a
while may already hold another user's links.

Creation.  A missing root (and any missing parent) is created with ``mkdir(0o700)`` (never
``exist_ok``-style trust) and then *opened and checked like an existing one*: if another
user won the race and made the directory first, we refuse it rather than use it.
Subdirectories (``evtchn/<domid>``, ``grants/<domid>``, ``xenstored``) are made and checked
the same way, each relative to the descriptor of the checked directory above it
([`ensure_private_subdirs`][]), so a component swapped during the walk cannot redirect it.

Ancestors.  The components *above* the root are resolved the ordinary way (``/tmp`` being a
link, as ``/var/run`` -> ``/run`` is, is fine), but each must be trusted: owned by root or
by us, and not writable by group/other unless it is sticky (``/tmp``: others cannot rename
our entries there).  Otherwise another user could rename our checked root away and put a
directory of theirs at its path between two of our path-based operations
([`check_ancestors`][]).

Files.  Every file under a root is opened with ``O_NOFOLLOW`` (a link there is refused with
a message naming it, never followed), ``O_NONBLOCK`` (a planted FIFO cannot hang us) and
checked to be a regular file ([`open_file`][]); new files are created with ``O_EXCL``;
a file that is rewritten is written to a temporary file in the same directory and
``rename``\\ d over the old one.

Clients.  A XenStore client checks the directory of the socket it is about to connect to
([`check_socket`][]): inside a root it must be private; elsewhere (Xen's
``/var/run/xenstored``) it must be trusted as above, and the socket owned by us or root --
otherwise another user could have put their own listener there.

Defaults never name a predictable shared path: [`default_parent`][] is
``$XDG_RUNTIME_DIR`` when that is private, else the system's temporary directory, in which
callers make a fresh directory with ``tempfile.mkdtemp`` (unpredictable, 0700).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class RootPermissionError(PermissionError):
    """A root, a directory or a file under it, or a socket is not safe to use."""


def _user(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def describe(st: os.stat_result) -> str:
    """``owner uid 1001 (mallory), mode 0777`` for an ``lstat``/``fstat`` result."""
    return f"owner {_user(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _is_link(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _refuse_link(path: str, what: str) -> RootPermissionError:
    return RootPermissionError(
        errno.ELOOP,
        f"{path} is a symbolic link (to {_link_target(path)}); aioxen never follows a link "
        f"as {what}: name a real directory of your own, or remove the link",
    )


def check_private(st: os.stat_result, path: str, what: str = "a root") -> None:
    """Raise [`RootPermissionError`][] unless ``st`` (from ``fstat`` of an ``O_NOFOLLOW``
    descriptor of ``path``) is a directory owned by us with no group/other access."""
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_link(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, f"{path} ({what}) is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise RootPermissionError(
            errno.EPERM,
            f"refusing {path} as {what}: it belongs to another user ({describe(st)}), not to "
            f"{_user(euid)}; whoever owns it can read and replace everything in it -- "
            f"choose a directory of your own (e.g. a fresh one from `mktemp -d`)",
        )
    if st.st_mode & 0o077:
        raise RootPermissionError(
            errno.EPERM,
            f"refusing {path} as {what}: group/other have access to it ({describe(st)}); "
            f"anyone who can open the files in it can act as any domain -- run "
            f"`chmod 700 {path}` (if nobody else has used it) or choose a private directory",
        )


def _trusted_dir(st: os.stat_result) -> bool:
    """Owned by root or us, and nobody else may rename its entries."""
    if st.st_uid not in (0, os.geteuid()):
        return False
    return not st.st_mode & 0o022 or bool(st.st_mode & stat.S_ISVTX)


def check_ancestors(path: str) -> None:
    """Raise [`RootPermissionError`][] unless every existing directory above ``path``
    (as written and as resolved) is trusted: owned by root or us and not writable by others
    unless sticky.  Links among them must be owned by root or us."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    seen: set[str] = set()
    for chain in (parent, os.path.realpath(parent)):
        p = chain
        prefixes = []
        while True:
            prefixes.append(p)
            up = os.path.dirname(p)
            if up == p:
                break
            p = up
        for p in reversed(prefixes):
            if p in seen:
                continue
            seen.add(p)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                break  # the rest of this chain is created by us (0700)
            ok = (
                st.st_uid in (0, os.geteuid())
                if stat.S_ISLNK(st.st_mode)
                else stat.S_ISDIR(st.st_mode) and _trusted_dir(st)
            )
            if not ok:
                raise RootPermissionError(
                    errno.EPERM,
                    f"refusing {path}: the directory {p} above it is not trusted "
                    f"({describe(st)}): another user could rename it away and put their own "
                    f"in its place -- choose a directory under one that only you and root "
                    f"can change (e.g. $XDG_RUNTIME_DIR or a fresh one from `mktemp -d`)",
                )


def _open_dir_at(name: str, dir_fd: int | None, path: str, what: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse_link(path, what) from None
        if exc.errno == errno.ENOTDIR:
            if _is_link(path):
                raise _refuse_link(path, what) from None
            raise NotADirectoryError(errno.ENOTDIR, f"{path} ({what}) is not a directory") from None
        raise


def _mkdir_at(name: str, dir_fd: int | None) -> bool:
    """``mkdir(name, 0o700)``; ``True`` if we made it, ``False`` if something was there."""
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        return False
    return True


def open_private_dir(
    path: str | os.PathLike[str], *, create: bool = True, what: str = "a root"
) -> int:
    """A descriptor (``O_DIRECTORY``) of the private directory ``path``, created 0700 with
    any missing parents if ``create``.  Refuses links, other owners, group/other access
    and untrusted ancestors (see the module docstring)."""
    path = os.path.abspath(os.fspath(path))
    check_ancestors(path)
    missing: list[str] = []
    p = path
    while create and not os.path.lexists(p):
        missing.append(p)
        up = os.path.dirname(p)
        if up == p:
            break
        p = up
    made = False
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            made = False  # someone else's, perhaps: checked below like any existing one
        else:
            made = d == path
    if missing:
        check_ancestors(path)  # the parents we made are ours; one made by another is not
    fd = _open_dir_at(path, None, path, what)
    try:
        st = os.fstat(fd)
        if made and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
            st = os.fstat(fd)
        check_private(st, path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_private_dir(
    path: str | os.PathLike[str], *, create: bool = True, what: str = "a root"
) -> str:
    """[`open_private_dir`][] without keeping the descriptor; returns the absolute path."""
    os.close(open_private_dir(path, create=create, what=what))
    return os.path.abspath(os.fspath(path))


def ensure_private_subdirs(root: str, *parts: str, create: bool = True) -> str:
    """Check the root, then make (if ``create``) and check ``root/parts[0]/parts[1]/...``
    one component at a time, each relative to the descriptor of the one above; returns the
    path.  ``FileNotFoundError`` if a part is missing and not ``create``."""
    fd = open_private_dir(root, create=False)
    path = root
    try:
        for part in parts:
            path = os.path.join(path, part)
            made = create and _mkdir_at(part, fd)
            sub = _open_dir_at(part, fd, path, "a directory in a root")
            os.close(fd)
            fd = sub
            st = os.fstat(fd)
            if made and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
                st = os.fstat(fd)
            check_private(st, path, "a directory in a root")
    finally:
        os.close(fd)
    return path


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of a file under a root: never through a link (``RootPermissionError``
    naming it), never blocking on a FIFO, only regular files (``O_CLOEXEC`` added)."""
    try:
        fd = os.open(path, flags | _FILE_FLAGS, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RootPermissionError(
                errno.ELOOP,
                f"refusing to open {path}: it is a symbolic link (to {_link_target(path)}); "
                f"aioxen never reads or writes through a link in its root -- remove it",
            ) from None
        if exc.errno == errno.EEXIST and flags & os.O_EXCL and _is_link(path):
            raise RootPermissionError(
                errno.ELOOP,
                f"refusing to create {path}: a symbolic link (to "
                f"{_link_target(path)}) is in its place -- remove it",
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RootPermissionError(
                errno.EPERM, f"refusing to open {path}: not a regular file ({describe(st)})"
            )
        if flags & os.O_NONBLOCK == 0:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new temporary file beside ``path`` (``O_EXCL``) and rename it
    over ``path`` atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a dead process with our pid
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_socket(path: str, *, private: bool) -> None:
    """Before connecting to the Unix socket ``path``: its directory must be a real
    directory, private (``private=True``: inside a root) or trusted (owned by root or us,
    not writable by others unless sticky), and the socket, if present, a socket owned by
    root or us.  A missing socket is left to ``connect`` to report."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    what = "the directory of a xenstored socket"
    try:
        fd = _open_dir_at(directory, None, directory, what)
    except FileNotFoundError:
        return  # nothing listens there yet: connect reports it
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if private:
        check_private(st, directory, what)
    elif not _trusted_dir(st):
        raise RootPermissionError(
            errno.EPERM,
            f"refusing to connect to {path}: its directory {directory} can be changed by "
            f"another user ({describe(st)}), who could have put their own listener there",
        )
    check_ancestors(directory)
    try:
        sst = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(sst.st_mode):
        raise _refuse_link(path, "a xenstored socket")
    if not stat.S_ISSOCK(sst.st_mode) or sst.st_uid not in (0, os.geteuid()):
        raise RootPermissionError(
            errno.EPERM,
            f"refusing to connect to {path}: not a socket of yours or root's ({describe(sst)})",
        )


def inside(path: str, root: str) -> bool:
    """Whether ``path`` lies under the directory ``root`` (lexically)."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path.startswith(root.rstrip(os.sep) + os.sep)


def default_parent() -> str | None:
    """Where to make a fresh private root: ``$XDG_RUNTIME_DIR`` if it is a private
    directory of ours, else ``None`` (the system's temporary directory)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        try:
            ensure_private_dir(runtime, create=False, what="$XDG_RUNTIME_DIR")
        except OSError:
            return None
        return runtime
    return None


__all__ = [
    "RootPermissionError",
    "check_ancestors",
    "check_private",
    "check_socket",
    "default_parent",
    "describe",
    "ensure_private_dir",
    "ensure_private_subdirs",
    "inside",
    "open_file",
    "open_private_dir",
    "replace_file",
]
