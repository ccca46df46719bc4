"""Fetch dataset sources: resumable downloads, checksums, safe extraction.

A *source* is one dict of a dataset's `sources` list in params.yaml:

    {"url": "https://.../archive.zip", "sha256": "..."}   downloaded (resumable), then extracted
    {"path": "/data/archive.tar.gz", "sha256": "..."}      a local archive, extracted
    {"path": "/data/kitti/dataset"}                         an already-extracted folder

`fetch(sources, dest_dir)` merges the content of every archive into `dest_dir` (archives that
share folders, like KITTI's velodyne / labels / calib / colour zips, merge into one tree) and writes
`dest_dir/SOURCES.json`, a manifest of what came from where. An already-extracted folder is
neither copied nor symlinked: its absolute path is recorded in the manifest and
`source_roots(dest_dir)` returns it beside `dest_dir`, so a 100 GB local copy costs nothing and
DVC does not try to cache it. The folder is taken as immutable: after changing its content,
rerun the download stage (`dvc repro -f download@...`).

Downloads go to a cache folder (`cache_dir`, default `$CMKD_DOWNLOAD_CACHE` or
`~/.cache/cmkd/downloads`) as `<name>.part` and are resumed with HTTP Range requests, both
within one call (`retries`) and across calls; a finished download is renamed without `.part`.
Extraction writes into a temporary folder inside `dest_dir` and moves the members into place
only once every source is fetched, verified and extracted; every member is checked first, and one that would land
outside `dest_dir` (absolute path, `..`, a link pointing outside, a device file) raises
UnsafeArchiveError naming the archive and the member, before anything is written. Links are
resolved as the filesystem will resolve them (through the archive's other links, chains
included), and every link of the staged tree is checked again with `realpath` before the merge.
Two members with the same name, or more than `max_extract_bytes` of content (all archives of a
call together; default `DEFAULT_MAX_EXTRACT_BYTES`, and never more than the free disk space)
raise UnsafeArchiveError naming the archive.
"""

from __future__ import annotations

import hashlib
import json
import http.client
import logging
import os
import posixpath
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from cmkd.utils.atomic import write_json
from cmkd.errors import ChecksumError, CmkdError, ConfigError, DataFormatError, UnsafeArchiveError

log = logging.getLogger(__name__)

MANIFEST = "SOURCES.json"
_CHUNK = 1 << 20
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
# Real SemanticKITTI (velodyne, labels, calib, colour images: ~80 GB extracted) and SUN RGB-D
# (~7 GB) fit under this; a zip bomb does not. params.yaml: data.<dataset>.max_extract_bytes.
DEFAULT_MAX_EXTRACT_BYTES = 128 * 1024**3
# Links followed while resolving one path before it counts as a loop (Linux's own limit).
_MAX_LINK_HOPS = 40
# Errors after which a download is worth resuming (the server or the network dropped us).
_TRANSIENT = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError, TimeoutError,
              urllib.error.URLError)


def sha256_file(path: str | Path, chunk: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("CMKD_DOWNLOAD_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmkd" / "downloads"


def fetch(
    sources: list[dict],
    dest_dir: Path,
    progress: bool = True,
    *,
    cache_dir: Path | None = None,
    retries: int = 5,
    keep_downloads: bool = False,
    timeout: float = 60.0,
    key: str = "sources",
    max_extract_bytes: int | None = None,
) -> Path:
    """Bring every source into `dest_dir` (see the module docstring); return `dest_dir`.

    Raises ChecksumError (a sha256 mismatch, naming the file), UnsafeArchiveError (naming the
    archive and the member), DataFormatError (a missing local path, an unreadable archive),
    ConfigError (a malformed source; `key` names the params entry in the message).
    All archives are extracted into one staging folder first and merged into `dest_dir` only
    when every source succeeded, so a failure leaves `dest_dir` as it was. Partial downloads
    stay in `cache_dir` for the next call. Completed downloads are deleted once extracted
    unless `keep_downloads`. At most `max_extract_bytes` (default DEFAULT_MAX_EXTRACT_BYTES) are
    extracted over all archives of the call.
    """
    dest_dir = Path(dest_dir)
    budget = _Budget(DEFAULT_MAX_EXTRACT_BYTES if max_extract_bytes is None else max_extract_bytes, f"{key}")
    checked = [_check_source(source, f"{key}[{i}]") for i, source in enumerate(sources)]
    dest_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    manifest: list[dict[str, Any]] = []
    finished_downloads: list[Path] = []
    staging = Path(tempfile.mkdtemp(prefix=".staging-", suffix=".tmp", dir=dest_dir))
    try:
        for source in checked:
            expected = source.get("sha256")
            if "url" in source:
                archive = download(source["url"], cache, progress=progress, retries=retries, timeout=timeout)
                checksum = _verify(archive, expected)
                _extract_into(archive, staging, progress, name=_url_basename(source["url"]), budget=budget)
                finished_downloads.append(archive)
                manifest.append({"url": source["url"], "sha256": checksum})
                continue
            path = Path(source["path"]).expanduser()
            if not path.exists():
                raise DataFormatError(path, "source path does not exist")
            if path.is_dir():
                if expected:
                    raise DataFormatError(path, "a sha256 was given for a folder; checksums apply to archive files")
                manifest.append({"path": str(path.resolve()), "folder": True})
                continue
            checksum = _verify(path, expected)
            _extract_into(path, staging, progress, budget=budget)
            manifest.append({"path": str(path.resolve()), "sha256": checksum})
        # Links of different archives can chain (one archive's link, another's path through it).
        _check_links_resolve_inside(staging, [Path(s.get("url") or s["path"]) for s in checked])
        _merge_tree(staging, dest_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(dest_dir / MANIFEST, {"sources": manifest})
    if not keep_downloads:
        for archive in finished_downloads:
            archive.unlink(missing_ok=True)
    return dest_dir


def source_roots(dest_dir: Path) -> list[Path]:
    """The folders holding a fetched dataset: `dest_dir` itself and every recorded folder source."""
    dest_dir = Path(dest_dir)
    roots = [dest_dir]
    manifest = dest_dir / MANIFEST
    if manifest.exists():
        for entry in json.loads(manifest.read_text())["sources"]:
            if entry.get("folder"):
                folder = Path(entry["path"])
                if not folder.is_dir():
                    raise DataFormatError(folder, f"recorded in {manifest} as a source folder but no longer exists")
                roots.append(folder)
    return roots


def _check_source(source: Mapping[str, Any], key: str) -> dict[str, Any]:
    if not isinstance(source, Mapping) or ("url" in source) == ("path" in source):
        raise ConfigError(key, f"a source must be a mapping with exactly one of 'url' or 'path', got {source!r}")
    unknown = set(source) - {"url", "path", "sha256"}
    if unknown:
        raise ConfigError(key, f"unknown keys {sorted(unknown)} (known: url, path, sha256)")
    if "url" in source and urllib.parse.urlparse(str(source["url"])).scheme not in ("http", "https"):
        raise ConfigError(key, f"url {source['url']!r} is not http(s); give local files as 'path'")
    sha = source.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)):
        raise ConfigError(f"{key}.sha256", f"must be 64 hex digits, got {sha!r}")
    return dict(source)


def _verify(path: Path, expected: str | None) -> str | None:
    """Check `path` against `expected` (hex sha256); return the checksum when one was given."""
    if not expected:
        return None
    actual = sha256_file(path)
    if actual.lower() != str(expected).lower():
        raise ChecksumError(path, f"sha256 mismatch: expected {expected}, got {actual}")
    return actual


# --------------------------------------------------------------------------- download

def _url_basename(url: str) -> str:
    base = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or "download"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)


def _cache_name(url: str) -> str:
    # The hash keeps two URLs with the same file name apart.
    return f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{_url_basename(url)}"


class DownloadError(CmkdError):
    """The server of a source URL cannot be reached at all (one line naming the URL and host)."""


def _unreachable(err: BaseException) -> str | None:
    """Why the host cannot be reached at all (name lookup failed, connection refused), or None
    for errors after which resuming may work (dropped connection, timeout, short read)."""
    reason = getattr(err, "reason", err) if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "the host refused the connection"
    return None


def download(url: str, cache_dir: Path, progress: bool = True, retries: int = 5, timeout: float = 60.0) -> Path:
    """Download `url` into `cache_dir`, resuming a previous `.part`; return the finished file."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / _cache_name(url)
    if final.exists():
        return final
    part = final.with_name(final.name + ".part")
    attempt = 0
    while True:
        try:
            _download_once(url, part, progress, timeout)
            break
        except _TRANSIENT as err:
            unreachable = _unreachable(err)
            if unreachable:  # no name or no server: resuming cannot help; say what failed, once
                host = urllib.parse.urlsplit(url).hostname
                raise DownloadError(f"download of {url}: host {host!r}: {unreachable}; check the URL and the network "
                                    "(or give a local copy as `path:`)") from err
            attempt += 1
            if attempt > retries:
                raise DataFormatError(part, f"download of {url} failed after {retries} retries ({err}); "
                                            "run again to resume") from err
            log.warning("download of %s interrupted (%s); resuming (%d/%d)", url, err, attempt, retries)
            time.sleep(min(2.0 ** attempt * 0.1, 10.0))
    os.replace(part, final)
    return final


def _download_once(url: str, part: Path, progress: bool, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            return  # the .part already holds the whole file; the checksum (if any) confirms it
        raise DataFormatError(part, f"HTTP {err.code} for {url}") from err
    with response:
        if have and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                raise DataFormatError(part, f"server resumed {url} at byte {start}, expected {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # no range support: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                           desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            while block := response.read(_CHUNK):
                out.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size != total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _content_range_start(header: str | None) -> int | None:
    # "bytes 100-199/200"
    if not header or not header.startswith("bytes "):
        return None
    try:
        return int(header[6:].split("-", 1)[0])
    except ValueError:
        return None


# --------------------------------------------------------------------------- extraction

def archive_kind(path: Path) -> str | None:
    """'zip', 'tar' or None (not an archive), by name first, then by content."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    return None


class _Budget:
    """Bytes left to extract in one `fetch` call (a zip bomb stops at the bound)."""

    def __init__(self, limit: int, key: str):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(key.removesuffix(".sources") + ".max_extract_bytes",
                              f"must be a positive integer (bytes), got {limit!r}")
        self.limit = limit
        self.left = limit

    def reserve(self, archive: Path, nbytes: int) -> None:
        """Count `nbytes` more from `archive`; UnsafeArchiveError when over the bound or the disk."""
        self.left -= nbytes
        if self.left < 0:
            raise UnsafeArchiveError(archive, f"extracts to more than max_extract_bytes = {self.limit} bytes "
                                              "(raise data.<dataset>.max_extract_bytes if this archive is genuine)")

    def check_disk(self, archive: Path, nbytes: int, where: Path) -> None:
        free = shutil.disk_usage(where).free
        if nbytes > free:
            raise UnsafeArchiveError(archive, f"extracts to {nbytes} bytes but only {free} are free on the disk of {where}")


def _copy_counted(src, dst, archive: Path, member: str, budget: _Budget, declared: int) -> None:
    """Copy a member's stream, counting real bytes: a zip's declared sizes can lie."""
    written = 0
    while block := src.read(_CHUNK):
        written += len(block)
        if written > declared:
            raise UnsafeArchiveError(archive, f"member {member!r} holds more than its declared {declared} bytes")
        dst.write(block)


def _extract_into(archive: Path, dest_dir: Path, progress: bool, name: str | None = None,
                  budget: _Budget | None = None) -> None:
    """Extract `archive` into a temporary folder in `dest_dir`, then move its content into place.

    A file that is not an archive (a yaml, a txt) is copied as it is, under `name`."""
    kind = archive_kind(archive)
    budget = budget or _Budget(DEFAULT_MAX_EXTRACT_BYTES, "sources")
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", suffix=".tmp", dir=dest_dir))
    try:
        if kind == "zip":
            _extract_zip(archive, tmp, progress, budget)
        elif kind == "tar":
            _extract_tar(archive, tmp, progress, budget)
        else:  # a single non-archive file (a yaml, a txt): copied as it is
            budget.reserve(archive, archive.stat().st_size)
            shutil.copy2(archive, tmp / (name or archive.name))
        _merge_tree(tmp, dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_member_path(archive: Path, name: str) -> str:
    """Normalised relative path of a member, or UnsafeArchiveError when it escapes."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise UnsafeArchiveError(archive, f"member {name!r} has an absolute path")
    norm = posixpath.normpath(posix)
    if norm == ".." or norm.startswith("../"):
        raise UnsafeArchiveError(archive, f"member {name!r} escapes the extraction folder")
    return "" if norm == "." else norm


def _check_link(archive: Path, member: str, target: str, relative_to_member: bool) -> None:
    """A link is allowed only when its target stays inside the extraction folder."""
    posix = target.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise UnsafeArchiveError(archive, f"member {member!r} links to an absolute path {target!r}")
    base = posixpath.dirname(member) if relative_to_member else ""
    norm = posixpath.normpath(posixpath.join(base, posix))
    if norm == ".." or norm.startswith("../"):
        raise UnsafeArchiveError(archive, f"member {member!r} links outside the extraction folder ({target!r})")


def _resolve_link(archive: Path, member: str, links: dict[str, str]) -> None:
    """Resolve link `member` as the filesystem will: component by component from the extraction
    root, following the archive's links (chains included). UnsafeArchiveError when any step
    leaves the root, a target is absolute, or the chain loops."""
    remaining = [c for c in links[member].replace("\\", "/").split("/")]
    stack = member.split("/")[:-1]
    hops = 0
    while remaining:
        part = remaining.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise UnsafeArchiveError(archive, f"member {member!r} links outside the extraction folder "
                                                  f"({links[member]!r}, through the archive's links)")
            stack.pop()
            continue
        path = "/".join([*stack, part])
        if path in links:
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise UnsafeArchiveError(archive, f"member {member!r}: too many levels of links (a loop?)")
            target = links[path].replace("\\", "/")
            if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
                raise UnsafeArchiveError(archive, f"member {member!r} links through {path!r} to an absolute path")
            remaining = target.split("/") + remaining
            continue
        stack.append(part)


def _check_links_resolve_inside(root: Path, archives: list[Path]) -> None:
    """Every link under `root` (the staged tree of all archives) must resolve inside it."""
    real_root = os.path.realpath(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                real = os.path.realpath(path)
                if real != real_root and not real.startswith(real_root + os.sep):
                    rel = os.path.relpath(path, root)
                    names = ", ".join(a.name for a in archives)
                    raise UnsafeArchiveError(Path(names), f"member {rel!r} links outside the extraction folder "
                                                          "once the archives are merged")


def _no_duplicates(archive: Path, entries: Iterable[tuple[str, bool]]) -> None:
    """Two members with one name: which one lands would depend on the extractor."""
    seen: dict[str, bool] = {}
    for rel, is_dir in entries:
        if rel in seen and not (is_dir and seen[rel]):
            raise UnsafeArchiveError(archive, f"member {rel!r} appears more than once")
        seen[rel] = is_dir


def _no_member_through_link(archive: Path, names: Iterable[str], links: set[str]) -> None:
    """Reject members written through a link created by the same archive (a classic escape)."""
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise UnsafeArchiveError(archive, f"member {name!r} is written through the link {'/'.join(parts[:i])!r}")


def _extract_zip(archive: Path, out: Path, progress: bool, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataFormatError(archive, f"not a readable zip archive ({err})") from err
    with zf:
        infos = zf.infolist()
        links: dict[str, zipfile.ZipInfo] = {}
        targets: dict[str, str] = {}
        paths = []
        for info in infos:
            rel = _safe_member_path(archive, info.filename)
            paths.append(rel)
            if stat.S_ISLNK(info.external_attr >> 16):
                if info.file_size > 4096:
                    raise UnsafeArchiveError(archive, f"member {info.filename!r} is a link with a {info.file_size}-byte target")
                targets[rel] = zf.read(info).decode()
                _check_link(archive, rel, targets[rel], relative_to_member=True)
                links[rel] = info
        _no_duplicates(archive, ((rel, info.is_dir()) for rel, info in zip(paths, infos) if rel))
        for rel in targets:
            _resolve_link(archive, rel, targets)
        _no_member_through_link(archive, paths, set(links))
        declared = sum(info.file_size for info in infos)
        budget.check_disk(archive, declared, out)
        budget.reserve(archive, declared)
        for info, rel in tqdm(list(zip(infos, paths)), desc=f"extract {archive.name}", unit="file", disable=not progress):
            if not rel:
                continue
            target = out / rel
            if rel in links:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(targets[rel], target)
            elif info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as dst:
                        _copy_counted(src, dst, archive, info.filename, budget, info.file_size)
                except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                    raise DataFormatError(archive, f"member {info.filename!r} is corrupt ({err})") from err


def _extract_tar(archive: Path, out: Path, progress: bool, budget: _Budget) -> None:
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as err:
        raise DataFormatError(archive, f"not a readable tar archive ({err})") from err
    with tf:
        members = tf.getmembers()
        links = set()
        targets: dict[str, str] = {}
        paths = []
        for m in members:
            rel = _safe_member_path(archive, m.name)
            paths.append(rel)
            if m.issym():
                _check_link(archive, rel, m.linkname, relative_to_member=True)
                links.add(rel)
                targets[rel] = m.linkname
            elif m.islnk():
                _check_link(archive, rel, m.linkname, relative_to_member=False)
            elif not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(archive, f"member {m.name!r} is a device or fifo")
        _no_duplicates(archive, ((rel, m.isdir()) for rel, m in zip(paths, members) if rel))
        for rel in targets:
            _resolve_link(archive, rel, targets)
        _no_member_through_link(archive, paths, links)
        # A tar's header sizes are the bytes extracted (no per-member compression to lie about).
        declared = sum(m.size for m in members if m.isfile())
        budget.check_disk(archive, declared, out)
        budget.reserve(archive, declared)
        for m in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress):
            # The 'data' filter repeats the checks above inside tarfile (defence in depth) and
            # drops owners and unsafe modes.
            try:
                tf.extract(m, out, filter="data")
            except tarfile.FilterError as err:
                raise UnsafeArchiveError(archive, f"member {m.name!r}: {err}") from err


def _merge_tree(src: Path, dest: Path) -> None:
    """Move everything under `src` into `dest`, merging folders (later archives win on a clash)."""
    for entry in os.scandir(src):
        target = dest / entry.name
        if entry.is_dir(follow_symlinks=False) and target.is_dir() and not target.is_symlink():
            _merge_tree(Path(entry.path), target)
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry.path, target)
