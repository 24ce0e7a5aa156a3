"""Photo folders are untrusted: links, pipes, sockets, devices and subfolders are refused by name, never followed.

Everything here is real: symlinks from os.symlink, FIFOs from os.mkfifo, a bound Unix socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flen_resources.imaging import ImageRejected, open_regular, read_regular
from flen_resources.intake import (
    REFUSED_RECORD,
    IntakeError,
    Refused,
    add_photos,
    load_record,
    open_photo_folder,
    printable_name,
)

MARKER = b"FLEN-SECRET-MARKER-7f3a9c"


@contextmanager
def deadline(seconds: int = 5) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened without O_NONBLOCK blocks until a writer comes)."""
    def expired(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every photo folder, holding a marker that must never be copied."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(MARKER + b"\n")
    return path


@pytest.fixture
def hostile(tmp_path: Path, secret: Path) -> Iterator[Path]:
    """A photo folder with one photo and one of each entry that must be refused."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff photo bytes")
    os.symlink(secret, folder / "passwd.jpg")  # a link out of the folder
    os.symlink("photo.jpg", folder / "alias.jpg")  # even a link to a file beside it
    os.symlink(secret.parent, folder / "linked_dir")
    os.symlink(folder / "missing", folder / "dangling.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "album").mkdir()
    (folder / "album" / "inner.jpg").write_bytes(b"\xff\xd8\xff inner")
    (folder / ".DS_Store").write_bytes(b"hidden")
    os.symlink(secret, folder / ".hidden_link")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.jpg"))
    yield folder
    sock.close()


EXPECTED_REFUSED = {"alias.jpg": "symlink", "album": "subfolder", "dangling.jpg": "symlink",
                    "linked_dir": "symlink", "passwd.jpg": "symlink", "pipe.jpg": "not_regular_file",
                    "sock.jpg": "not_regular_file"}


def _codes(refused: list[Refused]) -> dict[str, str]:
    return {r.name: r.code for r in refused}


# -- scanning a folder ----------------------------------------------------------------------------

def test_scan_refuses_every_entry_but_regular_files(hostile):
    with deadline(), open_photo_folder(hostile) as folder:
        assert folder.files == ["photo.jpg"]
        assert _codes(folder.refused) == EXPECTED_REFUSED


def test_scan_names_the_entry_and_the_reason(hostile):
    with open_photo_folder(hostile) as folder:
        messages = {r.name: r.message for r in folder.refused}
    assert messages["passwd.jpg"].startswith("passwd.jpg: symbolic link")
    assert messages["pipe.jpg"] == "pipe.jpg: named pipe (FIFO), not a regular file"
    assert messages["sock.jpg"] == "sock.jpg: socket, not a regular file"
    assert messages["album"].startswith("album: subfolder")


def test_hidden_entries_are_skipped_silently(hostile):
    with open_photo_folder(hostile) as folder:
        names = set(folder.files) | {r.name for r in folder.refused}
    assert not any(n.startswith(".") for n in names)


def test_device_file_is_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    try:
        os.mknod(folder / "null.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    with deadline(), open_photo_folder(folder) as scanned:
        assert _codes(scanned.refused) == {"null.jpg": "not_regular_file"}
        assert scanned.refused[0].detail == "device file, not a regular file"
    with pytest.raises(ImageRejected) as info:
        open_regular(folder / "null.jpg")
    assert info.value.code == "not_regular_file"


def test_undecodable_and_control_character_names_are_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as fh:  # Latin-1, not UTF-8
        fh.write(b"x")
    (folder / "two\nlines.jpg").write_bytes(b"x")
    with open_photo_folder(folder) as scanned:
        assert scanned.files == []
        assert {r.code for r in scanned.refused} == {"bad_name"}
        for refused in scanned.refused:
            assert refused.name.isprintable() and "\n" not in refused.message
            refused.name.encode("utf-8")  # fit for Parquet and a terminal


def test_printable_name_escapes_only_what_must_be():
    assert printable_name("été.jpg") == "été.jpg"
    assert printable_name("a\nb") == "a\\nb"


# -- opening a file: O_NOFOLLOW, O_NONBLOCK, then fstat --------------------------------------------

def test_open_regular_does_not_follow_a_symlink(hostile):
    with pytest.raises(ImageRejected) as info:
        open_regular(hostile / "passwd.jpg")
    assert info.value.code == "symlink"


def test_open_regular_does_not_hang_on_a_fifo(hostile):
    with deadline(), pytest.raises(ImageRejected) as info:
        open_regular(hostile / "pipe.jpg")  # no writer: a blocking open would wait forever
    assert info.value.code == "not_regular_file"


def test_open_regular_refuses_a_socket_and_a_folder(hostile):
    for name, code in (("sock.jpg", "not_regular_file"), ("album", "subfolder")):
        with pytest.raises(ImageRejected) as info:
            open_regular(hostile / name)
        assert info.value.code == code, name


def test_entry_swapped_for_a_link_after_the_scan_is_still_refused(hostile, secret):
    # The scan saw a regular file; by the time it is read it is a link to the secret (the classic TOCTOU).
    with open_photo_folder(hostile) as folder:
        assert "photo.jpg" in folder.files
        os.replace(hostile / "passwd.jpg", hostile / "photo.jpg")
        with pytest.raises(ImageRejected) as info:
            folder.read("photo.jpg")
    assert info.value.code == "symlink"


def test_entry_swapped_for_a_fifo_after_the_scan_is_refused_without_hanging(hostile):
    with open_photo_folder(hostile) as folder:
        os.replace(hostile / "pipe.jpg", hostile / "photo.jpg")
        with deadline(), pytest.raises(ImageRejected) as info:
            folder.read("photo.jpg")
    assert info.value.code == "not_regular_file"


def test_read_regular_stops_at_max_bytes(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 11)
    assert read_regular(path, max_bytes=11) == b"x" * 11
    with pytest.raises(ImageRejected) as info:
        read_regular(path, max_bytes=10)
    assert info.value.code == "too_large"


def test_photo_folder_replaced_by_a_link_is_refused(tmp_path, hostile):
    inbox = tmp_path / "inbox_alice"
    os.symlink(hostile, inbox)
    with pytest.raises(IntakeError, match="symbolic link"):
        with open_photo_folder(inbox, follow=False):
            pass


# -- copying into the inbox (what `flen character add` does) ---------------------------------------

def _inbox(tmp_path: Path) -> Path:
    dest = tmp_path / "project" / "inbox" / "alice"
    dest.mkdir(parents=True)
    return dest


def _all_bytes(folder: Path) -> bytes:
    """Every regular file under `folder`, concatenated, walking without following links."""
    blob = b""
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if stat.S_ISREG(path.lstat().st_mode):
                blob += path.read_bytes()
    return blob


def test_add_photos_copies_regular_files_only(tmp_path, hostile):
    dest = _inbox(tmp_path)
    with deadline():
        report = add_photos(hostile, dest)
    assert report.copied == ["photo.jpg"]
    assert _codes(report.refused) == EXPECTED_REFUSED
    assert sorted(p.name for p in dest.iterdir()) == [REFUSED_RECORD, "photo.jpg"]
    assert not (dest / "photo.jpg").is_symlink()
    assert (dest / "photo.jpg").read_bytes() == (hostile / "photo.jpg").read_bytes()
    assert MARKER not in _all_bytes(tmp_path / "project")


def test_add_photos_records_what_it_refused(tmp_path, hostile):
    dest = _inbox(tmp_path)
    add_photos(hostile, dest)
    record = json.loads((dest / REFUSED_RECORD).read_text())
    assert {e["name"]: e["code"] for e in record["refused"]} == EXPECTED_REFUSED
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        loaded = load_record(fd)
    finally:
        os.close(fd)
    assert _codes(loaded) == EXPECTED_REFUSED
    assert all("refused by `flen character add`" in r.detail for r in loaded)
    # The record is hidden: a scan of the inbox sees only the photo, plus the recorded refusals.
    with open_photo_folder(dest, follow=False, with_record=True) as inbox:
        assert inbox.files == ["photo.jpg"]
        assert _codes(inbox.refused) == EXPECTED_REFUSED


def test_add_again_forgets_entries_that_became_files(tmp_path, hostile):
    dest = _inbox(tmp_path)
    add_photos(hostile, dest)
    os.unlink(hostile / "passwd.jpg")
    (hostile / "passwd.jpg").write_bytes(b"\xff\xd8\xff a real photo now")
    report = add_photos(hostile, dest)
    assert report.copied == ["passwd.jpg"]
    assert report.unchanged == ["photo.jpg"]
    record = json.loads((dest / REFUSED_RECORD).read_text())
    assert "passwd.jpg" not in {e["name"] for e in record["refused"]}
    assert "pipe.jpg" in {e["name"] for e in record["refused"]}  # still refused, still remembered


def test_clean_folder_writes_no_record(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"a")
    dest = _inbox(tmp_path)
    report = add_photos(src, dest)
    assert (report.copied, report.refused) == (["a.jpg"], [])
    assert sorted(p.name for p in dest.iterdir()) == ["a.jpg"]  # nothing hidden added, no temp left


def test_add_photos_refuses_an_inbox_that_is_a_link(tmp_path, hostile):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "project" / "inbox" / "alice"
    dest.parent.mkdir(parents=True)
    os.symlink(elsewhere, dest)
    with pytest.raises(IntakeError, match="symbolic link"):
        add_photos(hostile, dest)
    assert list(elsewhere.iterdir()) == []  # nothing written through the link


def test_name_clash_with_other_content_fails_and_leaves_no_temp(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"new")
    dest = _inbox(tmp_path)
    (dest / "a.jpg").write_bytes(b"old")
    with pytest.raises(IntakeError, match="already exists with other content"):
        add_photos(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.jpg"]
    assert (dest / "a.jpg").read_bytes() == b"old"


def test_name_clash_with_a_link_in_the_inbox_fails(tmp_path, secret):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"new")
    dest = _inbox(tmp_path)
    os.symlink(secret, dest / "a.jpg")
    with pytest.raises(IntakeError, match="not a regular file"):
        add_photos(src, dest)
    assert secret.read_bytes() == MARKER + b"\n"  # the link's target was not written either


@pytest.mark.parametrize("content", [b"not json", b'{"refused": "x"}', b'{"refused": [{"name": 1}]}',
                                     b'{"refused": [{"name": "a", "code": "ok", "detail": "forged"}]}'])
def test_a_garbage_record_is_ignored(tmp_path, content):
    dest = _inbox(tmp_path)
    (dest / REFUSED_RECORD).write_bytes(content)
    with open_photo_folder(dest, follow=False, with_record=True) as inbox:
        assert inbox.refused == []


def test_a_record_that_is_a_link_is_not_followed(tmp_path, secret):
    dest = _inbox(tmp_path)
    secret.write_text(json.dumps({"refused": [{"name": "x", "code": "symlink", "detail": "planted"}]}))
    os.symlink(secret, dest / REFUSED_RECORD)
    with open_photo_folder(dest, follow=False, with_record=True) as inbox:
        assert inbox.refused == []
