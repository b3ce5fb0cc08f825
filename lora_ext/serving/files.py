"""Writing files so that a half-written one never carries the final name, and a small progress bar.

A temporary is named `.<final name>.tmp-<pid>-<random>` beside the final path, so that one left by a killed
run (kill -9, power loss) is recognisable: `stale_temporaries(path)` lists those whose process is gone and
`remove_stale_temporaries(path)` removes them."""
import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings


# what follows the prefix in a temporary's name: the writer's pid, and tempfile's 8 characters. (Older releases wrote
# names without the pid; those are left alone: `.merged.tmp-20261205` or `.merged.tmp-previous`, a user's, reads the
# same.)
_TEMPORARY = re.compile(r"(\d+)-(?:old-)?[a-z0-9_]{8}")


def _tmp_prefix(path):
    return "." + os.path.basename(path) + ".tmp-"


def _pid_max():
    """The largest pid this machine gives (Linux's pid_max); 2**22 where it cannot be read (Linux's ceiling)."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 ** 22


def _pid_alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid < 2 ** 31  # another user's live process (or a number no pid can be)
    return True


def stale_temporaries(path):
    """Temporaries of `path` (atomic_path's names) whose writer is no longer running on this machine:
    `.<name>.tmp-<pid>-<random>` (or `-old-<random>`, a file kept aside) with a dead pid; <random> is tempfile's 8
    characters. Nothing else that begins so (a user's `.<name>.tmp-notes` or `.<name>.tmp-20261205`, or the names
    without a pid that older releases wrote, which read the same) is taken for one."""
    path = os.path.abspath(path)
    parent, prefix = os.path.dirname(path), _tmp_prefix(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    pids = {}  # each candidate's pid
    for entry in sorted(entries):
        m = _TEMPORARY.fullmatch(entry[len(prefix):]) if entry.startswith(prefix) else None
        if m is not None:
            pids[entry] = int(m.group(1))
    if not pids:
        return []
    # (a number no process can have is a user's: `.merged.tmp-20261205-snapshot`, r47)
    top = _pid_max()
    return [os.path.join(parent, e) for e, pid in pids.items() if pid <= top and not _pid_alive(pid)]


def _remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        with contextlib.suppress(OSError):
            os.remove(p)


def restore_kept_aside(path):
    """Where a run was killed between moving the old `path` aside and renaming its new output in (atomic_path with
    overwrite=True: kill -9, nothing can hold it back), `path` is missing and the old one lies aside
    (`.<name>.tmp-<pid>-old-<random>`, its writer gone): puts it back (the newest, if several), so that `path` is as
    it was before that run, and returns where it came from; else None. (h9: the next run removed both, the old output
    and the complete new one beside it, as stale temporaries.)"""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    prefix = _tmp_prefix(path)
    kept = [p for p in stale_temporaries(path) if "-old-" in os.path.basename(p)[len(prefix):]]
    if not kept:
        return None
    newest = max(kept, key=lambda p: os.lstat(p).st_mtime_ns)
    os.replace(newest, path)
    return newest


def remove_stale_temporaries(path):
    """Removes stale_temporaries(path); returns the paths removed."""
    removed = []
    for p in stale_temporaries(path):
        _remove(p)
        if not os.path.lexists(p):
            removed.append(p)
    return removed


def _checked(path):
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):  # (abspath('') is the current directory)
        raise ValueError(f"atomic_path: {path!r} is not a path")
    return os.path.abspath(path)


# a file system that cannot sync (or will not for this file): left as it is
_NO_SYNC = {errno.EINVAL, errno.EBADF, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP}


def _fsync(path):
    """os.fsync of `path` (a file or a directory); one that cannot be opened, or a file system that cannot sync
    (EINVAL), is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_SYNC:
            raise
    finally:
        os.close(fd)


def _synced(path):
    """Flushes what was written under `path` (a file, or a directory's files and the directory) to the disk, so that
    a rename of it into place names complete data after a power loss too (a rename is atomic, but the data behind
    it may still be in the page cache)."""
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path, topdown=False):
            for n in names:
                if not os.path.islink(os.path.join(root, n)):
                    _fsync(os.path.join(root, n))
            if root != path:  # (a subdirectory's entries: its files' names; the top one last, below)
                _fsync(root)
    _fsync(path)


def _synced_entry(path):
    """Flushes the directory holding `path`, so that a rename to `path` outlives a power loss. Called once the
    output is in place: a failure warns (the output is there; whether a power cut would keep it is unknown)
    rather than reporting a write that happened as failed."""
    try:
        _fsync(os.path.dirname(path))
    except OSError as e:
        warnings.warn(f"{path}: in place, but its directory could not be synced to the disk ({e}): a power cut "
                      f"now may lose the rename", stacklevel=3)


def _umask():
    """The process's umask, read without changing it (os.umask sets one to read it: another thread creating a file
    meanwhile would get that one): /proc/self/status on Linux, else os.umask set back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public(tmp, directory=False):
    """Gives temporary `tmp` the mode a plain open()/mkdir makes under the umask (mkstemp/mkdtemp make them
    private; 0o644 regardless widened a umask of 0o077)."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())


def _temporary(path, directory=False):
    """A new temporary beside `path` (atomic_path's name: `.<name>.tmp-<pid>-<random>`)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    base = _tmp_prefix(path) + f"{os.getpid()}-"
    if directory:
        return tempfile.mkdtemp(prefix=base, dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=base, dir=parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path, directory=False, overwrite=False, exclusive=False):
    """Yields a temporary path beside `path` (a file, or a directory when directory=True) to write into;
    on success it is renamed to `path` (os.replace), on any error it is removed.

    overwrite=True: an existing `path` of any kind (a non-empty directory too) is replaced; it is moved aside
    under a temporary name first and removed once the new one is in place (moved back if that fails).
    exclusive=True (without overwrite): a file that appeared at `path` while the temporary was written (another
    run) is not replaced: FileExistsError naming it (a directory never replaces a non-empty one anyway).

    Signals with Python handlers are held back across the rename (deferred_interrupt), so that the output is either
    in place or not when one lands (a caller that reports an interruption tells which from the path itself: the
    output is a new file or directory there, another inode, once in place)."""
    from ..named_adapters import deferred_interrupt
    path = _checked(path)
    tmp = None
    try:
        with deferred_interrupt():  # (the temporary made, and named here, whole: else left behind by a live pid)
            tmp = _temporary(path, directory)
        yield tmp
        _public(tmp, directory)
        _synced(tmp)
        aside = None
        with deferred_interrupt():
            if overwrite and os.path.lexists(path):
                aside = _replace_existing(tmp, path, _tmp_prefix(path) + f"{os.getpid()}-")
            elif exclusive and not directory:
                _no_replace(tmp, path)
            else:
                try:
                    os.replace(tmp, path)
                except OSError as e:  # (a directory never replaces a non-empty one: another run's, put there since)
                    if not (directory and e.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                        raise
                    raise FileExistsError(errno.EEXIST, "appeared while the output was written (another run?); not "
                                          "replaced", path) from None
        _synced_entry(path)
        if aside is not None:
            _remove(aside)  # (left behind, the next run removes it as a stale temporary)
    except BaseException:
        if tmp is not None:  # (nothing there any more once it was renamed)
            with deferred_interrupt():
                _remove(tmp)
        raise


def _no_replace(tmp, path):
    """Renames file `tmp` to `path` unless `path` exists by then (a hard link, then the temporary's name removed;
    where the file system has no hard links, a check and os.replace)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "appeared while the output was written (another run?); not replaced",
                              path) from None
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "appeared while the output was written (another run?); not "
                                  "replaced", path) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def _replace_existing(tmp, path, base):
    """Puts `tmp` in place of the existing `path`; returns where the old one was moved aside (to be removed), or
    None when a plain rename replaced it."""
    try:
        os.replace(tmp, path)  # a file over a file or a link, a directory over an empty directory
        return None
    except OSError as e:
        if e.errno not in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
    aside = tempfile.mktemp(prefix=base + "old-", dir=os.path.dirname(path))
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    return aside


_HELD = set()  # the directory descriptors _renaming holds now: a forked child closes its copies (register_at_fork)
_OPENING = [threading.Lock()]  # over each open and its note in _HELD: a fork waits (R7: one between the two left
# the child a copy of a descriptor the parent then locked)


def _close_held_in_child():
    _OPENING[0] = threading.Lock()
    for fd in list(_HELD):
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _OPENING[0].acquire(), after_in_parent=lambda: _OPENING[0].release(),
                        after_in_child=_close_held_in_child)


@contextlib.contextmanager
def _renaming(paths):
    """One writer at a time renames into the directories of `paths` (atomic_files): an exclusive flock on each
    directory, taken in one order. Two processes saving into one directory at once (G4) interleaved their renames:
    one save's weights beside the other's config, both saves exit 0 (peft loads the pair, 0.5 off either adapter's
    logits). The kernel lets go of a killed writer's lock. A flock belongs to the open file, which a forked child
    shares: the child closes its copies at once (else the parent's next save waited until the child exited: a
    DataLoader worker forked during a save on another thread, R6). Where a file system refuses flock on a directory
    (some network ones), nothing is locked, as before."""
    try:
        import fcntl
    except ImportError:  # (no fcntl, Windows: nothing is locked)
        yield
        return
    fds = []
    try:
        for d in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
            try:
                with _OPENING[0]:
                    fd = os.open(d, os.O_RDONLY)
                    _HELD.add(fd)
                    fds.append(fd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        for fd in fds:
            _HELD.discard(fd)
            os.close(fd)  # (the lock goes with the last descriptor of its open file)


@contextlib.contextmanager
def atomic_files(paths):
    """atomic_path for files that go together (an adapter's weights and its config): yields a temporary for each,
    and renames them into place only when every one is written; a rename that fails puts back those renamed
    before it (their old files kept aside, by a hard link, until all are in place), so that a failure leaves the
    old set as it was. A directory where a file goes is refused before any rename. Every old file is kept aside
    before the first rename, so that a run killed between two renames (kill -9: nothing can hold it back) leaves
    what torn_set recognises: files kept aside beside temporaries of only some of the set."""
    from ..named_adapters import deferred_interrupt
    paths = [_checked(p) for p in paths]
    tmps = []
    try:
        with deferred_interrupt():  # (each temporary made and noted whole)
            for p in paths:
                tmps.append(_temporary(p))
        yield tmps
        for p, t in zip(paths, tmps):
            _public(t)
            if os.path.isdir(p) and not os.path.islink(p):
                raise IsADirectoryError(errno.EISDIR, "is a directory, where a file is written", p)
            _synced(t)
        asides, renamed = [], []
        # (signals with Python handlers held back over the renames and their rollback: one landing between a
        # rename and its note would leave a new file beside an old one; two writers of one set rename one at a
        # time. The lock is waited for where Ctrl-C still lands, and the signals held are delivered once it is let
        # go: a SIGTERM handler that saves into this directory waited for good on the lock its own process held, R6)
        hold = None
        try:
            with _renaming(paths):
                hold = deferred_interrupt().__enter__()
                try:
                    kept = []
                    for p in paths:
                        kept.append(_kept_aside(p) if os.path.lexists(p) else None)
                        if kept[-1] is not None:
                            asides.append(kept[-1])
                    for p, t, aside in zip(paths, tmps, kept):
                        os.replace(t, p)
                        renamed.append((p, aside))
                except BaseException:
                    for p, aside in reversed(renamed):  # (each put back even when another cannot be)
                        with contextlib.suppress(OSError):
                            if aside is not None:
                                os.replace(aside, p)
                            else:  # (none was there)
                                _remove(p)
                    raise
                finally:
                    for a in asides:
                        _remove(a)
        finally:
            if hold is not None:
                hold.deliver()
        _synced_entry(paths[0])
    except BaseException:
        with deferred_interrupt():
            for t in tmps:
                _remove(t)
        raise


def torn_set(paths):
    """Where atomic_files(paths) was killed between two renames (its pid gone), and the files it left are still in
    place, a message naming the files in place from the new set, those still from the old one, and how to finish or
    undo the save by hand; else None. Such a run leaves files kept aside (`-old-`) and the temporaries of the files it
    had not renamed yet: those in place without a temporary are new, the others old. Its leftovers are only
    evidence while the directory holds what the run left: an old file in place that is no longer the one kept aside
    (another save, peft's or a copy, wrote the set since) makes them stale, not the set torn; and a file in place
    from the new save that changed since the kill leaves only the undo to advise."""
    by_pid = {}
    for p in paths:
        for leftover in stale_temporaries(p):
            m = _TEMPORARY.fullmatch(os.path.basename(leftover)[len(_tmp_prefix(p)):])
            if m is None:
                continue
            entry = by_pid.setdefault(int(m.group(1)), {"old": {}, "new": {}})
            entry["old" if "-old-" in os.path.basename(leftover) else "new"][p] = leftover
    for pid, entry in sorted(by_pid.items()):
        done = [p for p in paths if p not in entry["new"] and p in entry["old"] and os.path.lexists(p)]
        kill = max((_ctime(entry["old"][p]) for p in done), default=None)  # (the last rename the run made)
        waiting = [p for p in paths if p in entry["new"] and p in entry["old"] and _same_file(p, entry["old"][p])
                   and kill is not None and _ctime(p) <= kill + _SAME_CALL]
        if len(waiting) < len([p for p in paths if p in entry["new"] and os.path.lexists(p)]):
            continue  # (an old file in place was written again since: not what the run left)
        if waiting and done:
            names = lambda ps: ", ".join(os.path.basename(p) for p in ps)  # noqa: E731
            undo = "to undo it rename " + ", ".join(f"{entry['old'][p]} to {os.path.basename(p)}" for p in done)
            if all(_ctime(p) <= _ctime(entry["old"][p]) + _SAME_CALL for p in done):
                advice = ("To finish the save rename " + ", ".join(f"{entry['new'][p]} to {os.path.basename(p)}"
                                                                    for p in waiting) + "; " + undo)
            else:
                advice = (f"{names(done)} changed since the kill, so the save cannot be finished by hand: "
                          + undo[0].upper() + undo[1:])
            return (f"{os.path.dirname(os.path.abspath(paths[0]))}: a save there (pid {pid}) was killed between "
                    f"renaming its files into place: {names(done)} from the new save, {names(waiting)} from the old "
                    f"one, which do not go together. {advice}; or save the adapter again")
    return None


def _same_file(path, aside):
    """Whether `path` still holds the file kept aside as `aside` (the same inode, as _kept_aside's hard link makes;
    where it made a copy, the same bytes)."""
    try:
        if os.path.samefile(path, aside):
            return True
        if os.path.getsize(path) != os.path.getsize(aside):
            return False
        import filecmp
        return filecmp.cmp(path, aside, shallow=False)
    except OSError:
        return False


# A rename over a file changes the status of both inodes in one call (tmpfs stamps the unlinked one first), and the
# links a killed atomic_files made aside came before its renames: a file in place whose status changed more than
# this after the run's last rename was written (or touched) since, by someone else.
_SAME_CALL = 50_000_000  # ns


def _ctime(path):
    try:
        return os.stat(path, follow_symlinks=False).st_ctime_ns
    except OSError:
        return float("inf")


def _kept_aside(path):
    """A new name beside `path` that holds its file too (a hard link; where the file system has none, a copy into
    a file made exclusively), for atomic_files to put back."""
    prefix = _tmp_prefix(path) + f"{os.getpid()}-old-"
    for _ in range(100):
        aside = tempfile.mktemp(prefix=prefix, dir=os.path.dirname(path))
        try:
            os.link(path, aside, follow_symlinks=False)
            return aside
        except FileExistsError:  # (taken meanwhile: another name)
            continue
        except OSError:
            break
    fd, aside = tempfile.mkstemp(prefix=prefix, dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
        shutil.copyfileobj(src, out)
    return aside


class Progress:
    """A one-line progress bar on stderr (no dependency); `extra` is shown after the counts."""

    def __init__(self, total, desc="", stream=None, enabled=True, width=28):
        self.total, self.desc, self.width = max(int(total), 1), desc, width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.n, self.start, self._last = 0, time.perf_counter(), 0.0

    def update(self, n=1, extra=""):
        self.n += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.n >= self.total):
            self._last = now
            done = int(self.width * min(self.n, self.total) / self.total)
            bar = "#" * done + "." * (self.width - done)
            self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {now - self.start:5.1f}s {extra}")
            self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
