"""List the files an input names, reporting what cannot be read instead of failing or looping.

S3 is listed by ``storage.expand``. A local tree is walked here, because a recursive pyarrow listing
follows symbolic links into loops forever, stops at the first unreadable directory, and silently
drops named pipes, devices and broken links. Each entry the input would have read but cannot comes
back with a quarantine reason, and is never opened:

* ``not_a_file``: a named pipe, socket or device (opening a pipe blocks forever), or a directory whose
  name the glob matches (``x.json/`` for ``*.json``);
* ``unreadable_file``: a broken link, or a directory or file that cannot be listed or examined;
* ``symlink_loop``: a link to a directory that holds the input, or to one already listed (a loop, or
  the same files twice); every other linked directory is followed, once;
* ``not_utf8``: a name that is not UTF-8 (record ids and Parquet strings must be).

As with ``storage.expand``, files whose name starts with ``.`` or ``_`` are left out, and names are
relative to the part of the path before its first glob character.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass

from agentflan_ray.reading.jsontext import RAW_SURROGATE, printable
from agentflan_ray.storage import GLOB_CHARS, StorageConfig, expand, fs_path, glob_to_regex, is_s3


@dataclass
class Listed:
    path: str
    size: int
    name: str
    problem: str = ""  # a quarantine reason: report the entry, never open it
    detail: str = ""


def list_input(uri: str, storage: StorageConfig) -> list[Listed]:
    """The entries ``uri`` names, sorted by path; raises FileNotFoundError when it names nothing."""
    if is_s3(uri):
        return [Listed(path, size, name) for path, size, name in expand(uri, storage)]
    path = fs_path(uri)
    match = GLOB_CHARS.search(path)
    if match is not None:
        base = posixpath.dirname(path[: match.start()] + "x")
        pattern = path[len(base):].strip("/")
        # Without `**` a glob matches at one depth only: nothing deeper needs walking.
        depth = None if "**" in pattern else pattern.count("/") + 1
        last = pattern.rsplit("/", 1)[-1]
        return _Walk(base, glob_to_regex(path), depth, report_dirs=bool(last.strip("*"))).run()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"input not found: {uri}") from None
    except OSError as exc:
        return [_problem(path, posixpath.basename(path), "unreadable_file", exc.strerror or str(exc))]
    if stat.S_ISDIR(info.st_mode):
        return _Walk(path, None, None, report_dirs=False).run()
    return [_entry(path, posixpath.basename(path), info)]


def _problem(path: str, name: str, reason: str, detail: str) -> Listed:
    return Listed(printable(path), 0, printable(name), reason, detail)


def _entry(path: str, name: str, info: os.stat_result) -> Listed:
    if RAW_SURROGATE.search(path):
        return _problem(path, name, "not_utf8", "the file name is not UTF-8")
    if not stat.S_ISREG(info.st_mode):
        return _problem(path, name, "not_a_file", _kind(info.st_mode))
    return Listed(path, info.st_size, name)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


class _Walk:
    """Depth-first over real directories first, then over linked ones (each real directory once), so
    the listing does not depend on whether a link sorts before its target."""

    def __init__(self, base: str, regex, depth: int | None, report_dirs: bool):
        self.base, self.regex, self.depth, self.report_dirs = base, regex, depth, report_dirs
        self.found: list[Listed] = []
        self.listed: set[tuple[int, int]] = set()
        self.links: list[str] = []

    def run(self) -> list[Listed]:
        try:
            info = os.stat(self.base)
        except OSError:
            return []  # a glob under a missing directory matches nothing
        if not stat.S_ISDIR(info.st_mode):
            return []
        self.root_real = os.path.realpath(self.base)
        self._walk(self.base, info)
        while self.links:
            self.links.sort()
            link, self.links = self.links[0], self.links[1:]
            self._follow(link)
        return sorted(self.found, key=lambda entry: entry.path)

    def _walk(self, top: str, info: os.stat_result) -> None:
        self.listed.add((info.st_dev, info.st_ino))
        stack = [top]
        while stack:
            directory = stack.pop()
            if self.depth is not None and _depth(directory, self.base) >= self.depth:
                continue
            try:
                with os.scandir(directory) as entries:
                    entries = sorted(entries, key=lambda e: e.name)
            except OSError as exc:
                self._report(directory, "unreadable_file", f"cannot list the directory: {exc.strerror or exc}")
                continue
            for entry in entries:
                self._visit(entry, stack)

    def _visit(self, entry: os.DirEntry, stack: list[str]) -> None:
        try:
            if entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                self.links.append(entry.path)
                return
            if entry.is_dir(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                if (info.st_dev, info.st_ino) in self.listed:  # a bind mount of a directory above
                    self._report(entry.path, "symlink_loop", "a mount of a directory already listed")
                    return
                self.listed.add((info.st_dev, info.st_ino))
                stack.append(entry.path)
                if self.report_dirs:
                    self._consider(entry.path, None)
                return
            info = entry.stat(follow_symlinks=True)
        except OSError as exc:
            self._consider(entry.path, _stat_problem(exc))
            return
        self._consider(entry.path, info)

    def _follow(self, link: str) -> None:
        deep = self.depth is not None and _depth(link, self.base) >= self.depth
        if deep:  # nothing below can match; only the link itself might
            if self.report_dirs:
                self._consider(link, None)
            return
        try:
            info = os.stat(link)
        except OSError as exc:
            self._report(link, *_stat_problem(exc))
            return
        target = os.path.realpath(link)
        if _contains(target, self.root_real):
            self._report(link, "symlink_loop", f"links to {printable(target)}, which holds the input: a loop")
            return
        if (info.st_dev, info.st_ino) in self.listed:
            self._report(link, "symlink_loop", f"links to {printable(target)}, which is already listed")
            return
        if self.report_dirs:
            self._consider(link, None)
        self._walk(link, info)

    def _consider(self, path: str, info) -> None:
        """An entry the walk met: a file (its stat), a directory (``None``) or (reason, detail)."""
        name = posixpath.relpath(path, self.base)
        if posixpath.basename(name).startswith((".", "_")):
            return
        if self.regex is not None and not self.regex.match(path):
            return
        if info is None:
            self.found.append(_problem(path, name, "not_a_file", "a directory the glob matches"))
        elif isinstance(info, os.stat_result):
            self.found.append(_entry(path, name, info))
        else:
            self.found.append(_problem(path, name, *info))

    def _report(self, path: str, reason: str, detail: str) -> None:
        """A directory that cannot be walked: reported whatever the glob, which may match inside it."""
        name = posixpath.relpath(path, self.base) if path != self.base else posixpath.basename(path)
        self.found.append(_problem(path, name, reason, detail))


def _stat_problem(exc: OSError) -> tuple[str, str]:
    if exc.errno == errno.ELOOP:
        return "symlink_loop", "a symbolic link that leads back to itself"
    if isinstance(exc, FileNotFoundError):
        return "unreadable_file", "a broken symbolic link"
    return "unreadable_file", f"cannot examine it: {exc.strerror or exc}"


def _depth(path: str, base: str) -> int:
    return 0 if path == base else posixpath.relpath(path, base).count("/") + 1


def _contains(directory: str, path: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")
