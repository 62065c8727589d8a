"""Disk errors and checkpoint rotation at the file level (minidetr/files.py): one sentence
naming the file, what it is and what to do; the previous file intact; no temporary left."""
from __future__ import annotations

import errno
import os

import pytest

import minidetr.files as files_module
from minidetr.files import (DiskWriteError, atomic_write, disk_write_error, format_size,
                            keep_previous, make_folder, write_text)


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, "cannot write the checkpoint runs/x/last.npz: no space left on the device "
                   "of runs/x (the checkpoint needs about 12.3 MB; free some space there, "
                   "e.g. old checkpoints, or write to another folder)"),
    (errno.EROFS, "cannot write the checkpoint runs/x/last.npz: runs/x is on a read-only file "
                  "system (write to another folder)"),
    (errno.EACCES, "cannot write the checkpoint runs/x/last.npz: permission denied: this user "
                   "may not write in runs/x (change its permissions or write to another "
                   "folder)"),
    (errno.EIO, "cannot write the checkpoint runs/x/last.npz: Input/output error (errno 5)"),
])
def test_each_disk_error_is_one_sentence_naming_file_what_and_remedy(code, expected):
    error = disk_write_error(OSError(code, os.strerror(code)), "runs/x/last.npz",
                             "checkpoint", size_hint=12_345_678)
    assert isinstance(error, OSError) and error.errno == code
    assert str(error) == expected
    assert (error.what, str(error.path)) == ("checkpoint", "runs/x/last.npz")


def test_sizes_read_like_df():
    assert [format_size(n) for n in (12, 1_500, 12_345_678, 3e9)] == \
        ["12 bytes", "1.5 kB", "12.3 MB", "3.0 GB"]


def test_a_full_disk_during_a_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "metrics.jsonl", "old\n")
    with pytest.raises(DiskWriteError) as err:
        with atomic_write(path, "w", what="metrics", size_hint=2_000) as f:
            f.write("half of the new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value).startswith(f"cannot write the metrics {path}: no space left on the "
                                     f"device of {tmp_path} (the metrics needs about 2.0 kB")
    assert err.value.__cause__ is None and err.value.__suppress_context__   # no chained trace
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_errors_that_are_not_the_disks_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError):          # e.g. reading a source inside the block
        with atomic_write(tmp_path / "x.bin") as f:
            f.write(open(tmp_path / "missing", "rb").read())
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_be_made_is_a_disk_error(tmp_path, monkeypatch):
    def mkdir(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(files_module.Path, "mkdir", mkdir)
    with pytest.raises(DiskWriteError) as err:
        make_folder(tmp_path / "run", "run folder")
    assert str(err.value) == (f"cannot write the run folder {tmp_path / 'run'}: {tmp_path} is "
                              "on a read-only file system (write to another folder)")


def test_keep_previous_is_a_hard_link_and_survives_the_next_write(tmp_path):
    last, prev = tmp_path / "last.npz", tmp_path / "last.prev.npz"
    assert keep_previous(last, prev) is False and not prev.exists()   # nothing to keep yet
    write_text(last, "epoch 1")
    assert keep_previous(last, prev) is True
    assert os.path.samefile(last, prev) and last.stat().st_nlink == 2  # no copy made
    assert keep_previous(last, prev) is True                          # again: no change
    write_text(last, "epoch 2")                                       # atomic: new inode
    assert (prev.read_text(), last.read_text()) == ("epoch 1", "epoch 2")
    keep_previous(last, prev)
    write_text(last, "epoch 3")
    assert (prev.read_text(), last.read_text()) == ("epoch 2", "epoch 3")
    assert sorted(os.listdir(tmp_path)) == ["last.npz", "last.prev.npz"]


def test_keep_previous_copies_where_hard_links_are_not_supported(tmp_path, monkeypatch):
    def link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")        # e.g. FAT, some NFS
    monkeypatch.setattr(files_module.os, "link", link)
    last, prev = tmp_path / "last.npz", tmp_path / "last.prev.npz"
    write_text(last, "epoch 1")
    assert keep_previous(last, prev) is True
    assert prev.read_text() == "epoch 1" and not os.path.samefile(last, prev)
    assert sorted(os.listdir(tmp_path)) == ["last.npz", "last.prev.npz"]


def test_keep_previous_on_a_full_disk_says_so_and_leaves_both_files(tmp_path, monkeypatch):
    last, prev = tmp_path / "last.npz", tmp_path / "last.prev.npz"
    write_text(last, "epoch 2")
    write_text(prev, "epoch 1")

    def link(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")       # no room for an inode
    monkeypatch.setattr(files_module.os, "link", link)
    with pytest.raises(DiskWriteError, match="cannot write the checkpoint .*last.prev.npz: no "
                                             "space left"):
        keep_previous(last, prev, what="checkpoint")
    assert (last.read_text(), prev.read_text()) == ("epoch 2", "epoch 1")
    assert sorted(os.listdir(tmp_path)) == ["last.npz", "last.prev.npz"]
