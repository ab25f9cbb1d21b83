"""Atomic writes: whole files or nothing, with the permissions the user's umask gives any other tool's files."""

import os
import stat

import pytest

from safe_diffusion.common.outputs import atomic_write_bytes, atomic_write_json, current_umask


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask_permissions(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    for name in ("a.bin", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json"]  # no temp files left


def test_replacing_a_file_is_atomic_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails mid-write
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_failed_command_takes_back_only_what_it_wrote(tmp_path):
    from safe_diffusion.common.outputs import output_dir

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "earlier.png").write_bytes(b"earlier run")
    (folder / "earlier.json").write_bytes(b"{}")
    (folder / "unrelated.txt").write_bytes(b"keep")
    with pytest.raises(OSError), output_dir(folder) as out:
        atomic_write_bytes(out.file("earlier.png"), b"new image")  # replaces an earlier run's file
        atomic_write_bytes(out.file("new.png"), b"new")
        raise OSError(28, "No space left on device")  # e.g. the sidecar's write fails
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        "earlier.png": b"earlier run",
        "earlier.json": b"{}",
        "unrelated.txt": b"keep",
    }

    with output_dir(folder) as out:  # success: the new content stays and nothing else is left behind
        atomic_write_bytes(out.file("earlier.png"), b"new image")
    assert (folder / "earlier.png").read_bytes() == b"new image"
    assert sorted(p.name for p in folder.iterdir()) == ["earlier.json", "earlier.png", "unrelated.txt"]

    with pytest.raises(KeyboardInterrupt), output_dir(tmp_path / "a" / "b") as out:
        atomic_write_bytes(out.file("x"), b"x")
        raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()  # folders it created are removed too


def test_rollback_tries_every_path_and_raises_after(tmp_path):
    """One file that cannot be removed does not stop the rollback: the others go, then the error is raised."""
    from safe_diffusion.common.outputs import OutputDir

    out = OutputDir(tmp_path)
    stuck = out.file("stuck")
    stuck.mkdir()  # unlink of a folder fails (IsADirectoryError or PermissionError)
    (stuck / "inside").write_text("x")
    later = out.file("later.txt")
    later.write_text("new")
    with pytest.raises(OSError):
        out.rollback()
    assert not later.exists() and stuck.is_dir()
