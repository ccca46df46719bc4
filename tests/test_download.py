"""cmkd.data.download: resumable downloads from a local HTTP server, checksums, safe extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from cmkd.data.download import fetch, sha256_file, source_roots
from cmkd.errors import ChecksumError, ConfigError, DataFormatError, UnsafeArchiveError

# --------------------------------------------------------------------------- helpers

def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def add_tar_link(path: Path, name: str, target: str, hard: bool = False, extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(name)
        info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
        info.linkname = target
        tf.addfile(info)
        for member, data in (extra or {}).items():
            m = tarfile.TarInfo(member)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class _Server:
    """Serves `files` with Range support; the first GET of a path can be cut after `cut` bytes."""

    def __init__(self, files: dict[str, bytes], cut: dict[str, int] | None = None, honour_range: bool = True):
        self.files, self.cut = files, dict(cut or {})
        self.honour_range = honour_range
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and server.honour_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut.pop(self.path, None)
                self.wfile.write(body[:cut] if cut is not None else body)
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive_bytes(tmp_path):
    payload = {"dataset/sequences/00/calib.txt": b"P2: 1\n" * 50,
               "dataset/sequences/00/velodyne/000000.bin": os.urandom(200_000)}
    path = make_tar(tmp_path / "src.tar.gz", payload)
    return path.read_bytes(), payload


# --------------------------------------------------------------------------- tests

def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_download_resumes_with_range_within_one_call(tmp_path, archive_bytes):
    data, payload = archive_bytes
    with _Server({"/kitti.tar.gz": data}, cut={"/kitti.tar.gz": 70_000}) as srv:
        out = fetch([{"url": srv.url + "/kitti.tar.gz", "sha256": hashlib.sha256(data).hexdigest()}],
                    tmp_path / "raw", progress=False, cache_dir=tmp_path / "cache")
    assert srv.requests == [("/kitti.tar.gz", None), ("/kitti.tar.gz", "bytes=70000-")]
    for name, content in payload.items():
        assert (out / name).read_bytes() == content
    assert everything_under(tmp_path / "cache") == []  # finished download removed after extraction
    manifest = json.loads((out / "SOURCES.json").read_text())
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_interrupted_download_leaves_part_and_resumes_next_call(tmp_path, archive_bytes):
    data, payload = archive_bytes
    url_path = "/seq.tar.gz"
    with _Server({url_path: data}, cut={url_path: 50_000}) as srv:
        with pytest.raises(DataFormatError, match="run again to resume"):
            fetch([{"url": srv.url + url_path}], tmp_path / "raw", progress=False,
                  cache_dir=tmp_path / "cache", retries=0)
        parts = list((tmp_path / "cache").glob("*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size == 50_000
        assert everything_under(tmp_path / "raw") == []  # nothing extracted, no staging left
        fetch([{"url": srv.url + url_path}], tmp_path / "raw", progress=False, cache_dir=tmp_path / "cache", retries=0)
    assert srv.requests[-1] == (url_path, "bytes=50000-")
    assert ((tmp_path / "raw" / "dataset/sequences/00/velodyne/000000.bin").read_bytes()
            == payload["dataset/sequences/00/velodyne/000000.bin"])


def test_server_without_range_support_restarts_cleanly(tmp_path, archive_bytes):
    data, payload = archive_bytes
    with _Server({"/a.tar.gz": data}, cut={"/a.tar.gz": 30_000}, honour_range=False) as srv:
        fetch([{"url": srv.url + "/a.tar.gz", "sha256": hashlib.sha256(data).hexdigest()}], tmp_path / "raw",
              progress=False, cache_dir=tmp_path / "cache")
    assert ((tmp_path / "raw" / "dataset/sequences/00/calib.txt").read_bytes()
            == payload["dataset/sequences/00/calib.txt"])


def test_checksum_mismatch_names_file_and_writes_nothing(tmp_path, archive_bytes):
    data, _ = archive_bytes
    with _Server({"/x.tar.gz": data}) as srv:
        with pytest.raises(ChecksumError, match=r"x\.tar\.gz.*sha256 mismatch"):
            fetch([{"url": srv.url + "/x.tar.gz", "sha256": "0" * 64}], tmp_path / "raw", progress=False,
                  cache_dir=tmp_path / "cache")
    assert everything_under(tmp_path / "raw") == []
    local = tmp_path / "local.tar.gz"
    local.write_bytes(data)
    with pytest.raises(ChecksumError, match="local.tar.gz") as err:
        fetch([{"path": str(local), "sha256": "f" * 64}], tmp_path / "raw2", progress=False)
    assert isinstance(err.value, ValueError)
    assert everything_under(tmp_path / "raw2") == []


def test_a_failing_second_source_leaves_the_first_unmerged(tmp_path):
    good = make_zip(tmp_path / "good.zip", {"dataset/a.txt": b"a"})
    bad = make_zip(tmp_path / "bad.zip", {"../escape.txt": b"x"})
    with pytest.raises(UnsafeArchiveError):
        fetch([{"path": str(good)}, {"path": str(bad)}], tmp_path / "raw", progress=False)
    assert everything_under(tmp_path / "raw") == []


@pytest.mark.parametrize("case", [
    "zip_dotdot", "zip_absolute", "zip_symlink_out", "tar_dotdot", "tar_absolute", "tar_symlink_out",
    "tar_symlink_absolute", "tar_hardlink_out", "tar_through_link", "tar_device",
])
def test_unsafe_archives_are_rejected_naming_archive_and_member(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    if case == "zip_dotdot":
        archive, member = make_zip(src / "evil.zip", {"ok.txt": b"1", "a/../../evil.txt": b"x"}), "a/../../evil.txt"
    elif case == "zip_absolute":
        archive, member = make_zip(src / "evil.zip", {"/tmp/evil.txt": b"x"}), "/tmp/evil.txt"
    elif case == "zip_symlink_out":
        archive, member = make_zip(src / "evil.zip", {"ok.txt": b"1"}, symlinks={"link": "../../outside"}), "link"
    elif case == "tar_dotdot":
        archive, member = make_tar(src / "evil.tar.gz", {"../evil.txt": b"x"}), "../evil.txt"
    elif case == "tar_absolute":
        archive, member = make_tar(src / "evil.tar.bz2", {"/etc/evil.txt": b"x"}, mode="w:bz2"), "/etc/evil.txt"
    elif case == "tar_symlink_out":
        archive, member = add_tar_link(src / "evil.tar", "sub/link", "../../.."), "sub/link"
    elif case == "tar_symlink_absolute":
        archive, member = add_tar_link(src / "evil.tar", "link", "/etc"), "link"
    elif case == "tar_hardlink_out":
        archive, member = add_tar_link(src / "evil.tar", "hard", "../secret", hard=True), "hard"
    elif case == "tar_through_link":
        archive, member = add_tar_link(src / "evil.tar", "dir", ".", extra={"dir/x.txt": b"x"}), "dir/x.txt"
    else:  # a device file
        archive = src / "evil.tar"
        with tarfile.open(archive, "w") as tf:
            info = tarfile.TarInfo("dev")
            info.type = tarfile.CHRTYPE
            tf.addfile(info)
        member = "dev"
    dest = tmp_path / "out" / "raw"
    with pytest.raises(UnsafeArchiveError) as err:
        fetch([{"path": str(archive)}], dest, progress=False)
    message = str(err.value)
    assert archive.name in message and repr(member) in message
    assert isinstance(err.value, ValueError)
    assert everything_under(tmp_path / "out") == ["raw"]  # nothing inside, nothing beside
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tgz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")])
def test_tar_variants_and_merging_into_one_tree(tmp_path, mode, suffix):
    velodyne = make_tar(tmp_path / f"velodyne{suffix}", {"dataset/sequences/00/velodyne/000000.bin": b"v" * 32}, mode)
    labels = make_zip(tmp_path / "labels.zip", {"dataset/sequences/00/labels/000000.label": b"l" * 8,
                                                "dataset/sequences/00/": b""})
    out = fetch([{"path": str(velodyne)}, {"path": str(labels), "sha256": sha256_file(labels)}],
                tmp_path / "raw", progress=False)
    assert everything_under(out / "dataset") == ["sequences", "sequences/00", "sequences/00/labels",
                                                 "sequences/00/labels/000000.label", "sequences/00/velodyne",
                                                 "sequences/00/velodyne/000000.bin"]


def test_safe_internal_symlink_is_kept(tmp_path):
    archive = add_tar_link(tmp_path / "ok.tar", "data/link.txt", "real.txt", extra={"data/real.txt": b"hello"})
    out = fetch([{"path": str(archive)}], tmp_path / "raw", progress=False)
    assert (out / "data" / "link.txt").is_symlink()
    assert (out / "data" / "link.txt").read_bytes() == b"hello"


def test_extracted_folder_is_recorded_not_copied(tmp_path):
    folder = tmp_path / "kitti"
    (folder / "dataset" / "sequences").mkdir(parents=True)
    out = fetch([{"path": str(folder)}], tmp_path / "raw", progress=False)
    assert everything_under(out) == ["SOURCES.json"]
    assert source_roots(out) == [out, folder.resolve()]
    with pytest.raises(DataFormatError, match="checksums apply to archive files"):
        fetch([{"path": str(folder), "sha256": "a" * 64}], tmp_path / "raw2", progress=False)


def test_bad_source_entries_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.x\.sources\[0\]"):
        fetch([{"url": "ftp://example.org/a.zip"}], tmp_path / "raw", progress=False, key="data.x.sources")
    with pytest.raises(ConfigError, match="exactly one of"):
        fetch([{"sha256": "a" * 64}], tmp_path / "raw", progress=False)
    with pytest.raises(ConfigError, match="64 hex digits"):
        fetch([{"path": "x.zip", "sha256": "abc"}], tmp_path / "raw", progress=False)
    with pytest.raises(DataFormatError, match="does not exist"):
        fetch([{"path": str(tmp_path / "missing.zip")}], tmp_path / "raw", progress=False)


# --------------------------------------------------------------------------- links, bombs, duplicates

def _chain_links() -> dict[str, str]:
    # l1 resolves to the extraction root, so `dataset` (lexically inside) climbs 4 levels above it.
    return {"x1/x2/x3/x4/l1": "../../../..", "dataset": "x1/x2/x3/x4/l1/../../../../arch/SECRET"}


@pytest.mark.parametrize("kind", ["zip", "tar", "tar_reversed"])
def test_link_chain_that_escapes_through_another_link_is_refused(tmp_path, kind):
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "SECRET").write_bytes(b"secret")
    src = tmp_path / "src"
    src.mkdir()
    links = _chain_links()
    if kind == "zip":
        archive = make_zip(src / "evil.zip", {"x1/x2/x3/x4/f": b"1"}, symlinks=links)
    else:
        archive = src / "evil.tar"
        order = list(links.items())[::-1] if kind == "tar_reversed" else list(links.items())
        with tarfile.open(archive, "w") as tf:
            for name, target in order:
                info = tarfile.TarInfo(name)
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tf.addfile(info)
    dest = tmp_path / "out" / "raw"
    with pytest.raises(UnsafeArchiveError) as err:
        fetch([{"path": str(archive)}], dest, progress=False)
    assert archive.name in str(err.value) and "'dataset'" in str(err.value)
    assert everything_under(tmp_path / "out") == ["raw"]


def test_link_chain_across_two_archives_is_refused(tmp_path):
    links = _chain_links()
    first = make_zip(tmp_path / "a.zip", {"x1/x2/x3/x4/f": b"1"}, symlinks={"x1/x2/x3/x4/l1": links["x1/x2/x3/x4/l1"]})
    second = make_zip(tmp_path / "b.zip", {"other": b"2"}, symlinks={"dataset": links["dataset"]})
    dest = tmp_path / "out" / "raw"
    with pytest.raises(UnsafeArchiveError, match="a.zip, b.zip.*'dataset'"):
        fetch([{"path": str(first)}, {"path": str(second)}], dest, progress=False)
    assert everything_under(tmp_path / "out") == ["raw"]


def test_link_loop_is_refused_and_internal_chain_is_kept(tmp_path):
    loop = make_zip(tmp_path / "loop.zip", {}, symlinks={"a": "b", "b": "a"})
    with pytest.raises(UnsafeArchiveError, match="loop"):
        fetch([{"path": str(loop)}], tmp_path / "raw", progress=False)
    ok = make_zip(tmp_path / "ok.zip", {"d/real.txt": b"hi"}, symlinks={"d/l1": "real.txt", "top": "d/l1"})
    out = fetch([{"path": str(ok)}], tmp_path / "raw2", progress=False)
    assert (out / "top").read_bytes() == b"hi"


def test_archive_over_max_extract_bytes_is_refused_naming_it(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (4 << 20))
    assert bomb.stat().st_size < 20_000
    with pytest.raises(UnsafeArchiveError, match=r"bomb\.zip.*max_extract_bytes = 1000000"):
        fetch([{"path": str(bomb)}], tmp_path / "out" / "raw", progress=False, max_extract_bytes=1_000_000)
    assert everything_under(tmp_path / "out") == ["raw"]
    # The bound counts every archive of the call together; a tar's too.
    tar = make_tar(tmp_path / "t.tar.gz", {"a.bin": b"\0" * 600_000})
    with pytest.raises(UnsafeArchiveError, match=r"t\.tar\.gz"):
        fetch([{"path": str(tar)}, {"path": str(make_tar(tmp_path / "u.tgz", {"b.bin": b"1" * 600_000}))}][::-1],
              tmp_path / "raw3", progress=False, max_extract_bytes=1_000_000)
    assert (fetch([{"path": str(bomb)}], tmp_path / "raw2", progress=False, max_extract_bytes=5 << 20)
            / "zeros.bin").stat().st_size == 4 << 20
    with pytest.raises(ConfigError, match=r"data\.x\.max_extract_bytes"):
        fetch([{"path": str(bomb)}], tmp_path / "raw4", progress=False, key="data.x.sources", max_extract_bytes=0)


def test_zip_whose_member_holds_more_than_declared_is_refused(tmp_path):
    archive = make_zip(tmp_path / "liar.zip", {"a.bin": b"x" * 1000})
    data = bytearray(archive.read_bytes())
    # Patch the declared uncompressed size (stored member) in the central directory to 10 bytes.
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises((UnsafeArchiveError, DataFormatError)) as err:
        fetch([{"path": str(archive)}], tmp_path / "raw", progress=False)
    assert "liar.zip" in str(err.value)


def test_duplicate_member_names_are_refused_naming_the_archive(tmp_path):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/x.txt", b"1")
        with pytest.warns(UserWarning):
            zf.writestr("a/x.txt", b"2")
    with pytest.raises(UnsafeArchiveError, match=r"dup\.zip.*'a/x\.txt' appears more than once"):
        fetch([{"path": str(archive)}], tmp_path / "out" / "raw", progress=False)
    assert everything_under(tmp_path / "out") == ["raw"]
    tar = make_tar(tmp_path / "dup.tar", {"a": b"1"}, mode="w")
    with tarfile.open(tar, "a") as tf:
        info = tarfile.TarInfo("a")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"2"))
    with pytest.raises(UnsafeArchiveError, match=r"dup\.tar.*'a' appears more than once"):
        fetch([{"path": str(tar)}], tmp_path / "raw2", progress=False)
