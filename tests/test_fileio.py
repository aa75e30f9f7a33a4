"""Atomic writes: all or nothing, and the permissions the umask gives any new file (not mkstemp's owner-only)."""
import os
import stat
import tempfile

import pytest

from acestep_lora import fileio


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(umask):
    assert fileio.current_umask() == umask
    assert os.umask(umask) == umask  # still what it was


def test_files_and_folders_get_the_umask_modes(umask, tmp_path):
    fileio.atomic_write_text(str(tmp_path / "sub" / "manifest.json"), "{}")
    fileio.atomic_save(str(tmp_path / "tensor.pt"), lambda p: open(p, "wb").write(b"x"))
    with fileio.atomic_path(str(tmp_path / "sample.flac")) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"audio")
    with fileio.atomic_directory(str(tmp_path / "checkpoint")) as tmp:
        with open(os.path.join(tmp, "training_state.pt"), "wb") as f:
            f.write(b"state")
    for name in ("sub/manifest.json", "tensor.pt", "sample.flac", "checkpoint/training_state.pt"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    for name in ("sub", "checkpoint"):
        assert mode(tmp_path / name) == 0o777 & ~umask, name
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "sample.flac", "sub", "tensor.pt"]  # no temporaries left


def replacing_writer(path):
    """Writes as safetensors does: through a 0600 temporary of its own, renamed over ``path``."""
    fd, own = tempfile.mkstemp(dir=os.path.dirname(path))
    os.write(fd, b"tensors")
    os.close(fd)
    os.replace(own, path)


def test_writers_that_replace_the_file_get_the_umask_modes_too(umask, tmp_path):
    fileio.atomic_save(str(tmp_path / "lora.safetensors"), replacing_writer)
    with fileio.atomic_directory(str(tmp_path / "checkpoint")) as tmp:
        os.makedirs(os.path.join(tmp, "adapter"))
        replacing_writer(os.path.join(tmp, "adapter", "adapter_model.safetensors"))
    for name in ("lora.safetensors", "checkpoint/adapter/adapter_model.safetensors"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "checkpoint" / "adapter") == 0o777 & ~umask


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "manifest.json")
    fileio.atomic_write_text(path, "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_save(path, broken)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["manifest.json"]
