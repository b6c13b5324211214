"""massv.io: atomic files and directories with ordinary modes, and reads whose errors name the file."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from massv.errors import CorruptFileError, MassvError, MissingInputError
from massv.io import atomic_directory, atomic_write_json, atomic_write_text, check_safetensors, load_safetensors, read_json


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_get_ordinary_modes_and_replace_whole(tmp_path, umask_022):
    path = atomic_write_text(tmp_path / "a" / "config.yaml", "x: 1\n")
    assert path.read_text() == "x: 1\n" and mode(path) == 0o644  # tempfile alone would give 0600
    atomic_write_json(path, {"b": 2, "a": 1})
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temporary file left


def test_atomic_directory_modes_and_nothing_left_after_a_failed_write(tmp_path, umask_022):
    target = tmp_path / "final"
    with atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"v1")
        (staging / "sub").mkdir()
        (staging / "sub" / "config.json").write_text("{}")
    assert mode(target) == 0o755 and mode(target / "sub") == 0o755  # mkdtemp alone would give 0700
    assert mode(target / "weights.bin") == 0o644 and mode(target / "sub" / "config.json") == 0o644

    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(target) as staging:
            (staging / "weights.bin").write_bytes(b"v2, half")
            raise OSError(28, "No space left on device")
    assert (target / "weights.bin").read_bytes() == b"v1"  # the previous version is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # and no staging folder is left behind


def test_a_stricter_umask_is_respected(tmp_path):
    previous = os.umask(0o077)
    try:
        path = atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert mode(path) == 0o600


def test_latin1_json_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes('[\n{"q": "Caf\u00e9?"}\n]'.encode("latin-1"))
    with pytest.raises(CorruptFileError, match=r"data\.json is not UTF-8 text \(byte 0xe9 at line 2") as error:
        read_json(path)
    assert isinstance(error.value, MassvError)
    (tmp_path / "broken.json").write_text('{"a": 1,,}')
    with pytest.raises(CorruptFileError, match=r"broken\.json is not valid JSON: .* line 1, column 9"):
        read_json(tmp_path / "broken.json")
    with pytest.raises(MissingInputError, match="nowhere.json does not exist"):
        read_json(tmp_path / "nowhere.json")


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "projector.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    check_safetensors(path)
    assert torch.equal(load_safetensors(path)["w"], torch.arange(1000, dtype=torch.float32))
    data = path.read_bytes()
    for cut in (len(data) // 2, 20, 4):  # tensor bytes, header, header length
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match=r"projector\.safetensors is not a complete safetensors file"):
            load_safetensors(path)
