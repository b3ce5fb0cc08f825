"""Writing files so that a half-written one never carries the final name, and a small progress bar."""
import contextlib
import os
import shutil
import sys
import tempfile
import time


@contextlib.contextmanager
def atomic_path(path, directory=False):
    """Yields a temporary path beside `path` (a file, or a directory when directory=True) to write into;
    on success it is renamed to `path` (os.replace), on any error it is removed."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    base = "." + os.path.basename(path) + ".tmp-"
    if directory:
        tmp = tempfile.mkdtemp(prefix=base, dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=base, dir=parent)
        os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o755 if directory else 0o644)  # mkstemp/mkdtemp make them private
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


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
