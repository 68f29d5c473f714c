"""flux.checksums: a checksum file finds a file changed in place, at the same size."""

from __future__ import annotations

from pathlib import Path

from flux.checksums import mismatch, read_checksums, write_checksums


def test_a_same_size_change_is_found_and_a_size_change_without_hashing(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 1000)
    write_checksums(tmp_path / "sums.json", [data])
    entry = read_checksums(tmp_path / "sums.json")["data.bin"]
    assert entry["bytes"] == 256_000 and mismatch(data, entry) is None

    with open(data, "r+b") as f:  # one byte, in place
        f.seek(100_000)
        f.write(b"\xff")
    assert mismatch(data, entry) == "data.bin does not match its checksum"
    assert mismatch(data, entry, check_digest=False) is None  # the cheap check sees sizes only
    data.write_bytes(data.read_bytes()[:-1])
    assert "is 255999 bytes, not the 256000" in (mismatch(data, entry, check_digest=False) or "")
    data.unlink()
    assert mismatch(data, entry) == "data.bin is missing"
