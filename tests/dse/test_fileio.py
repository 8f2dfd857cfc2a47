"""Content digests for cache keys: a file's SHA-256, a folder's listing of (path, size, mtime)."""

from __future__ import annotations

import hashlib
import os

from dse.fileio import content_digest


def test_a_file_digest_is_its_sha256(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    assert content_digest(f) == hashlib.sha256(b"weights").hexdigest()
    assert content_digest(None) is None and content_digest(tmp_path / "nope") == "missing"


def test_a_folder_digest_changes_with_any_file_added_resized_or_touched(tmp_path):
    tree = tmp_path / "val" / "cls0"
    tree.mkdir(parents=True)
    (tree / "a.png").write_bytes(b"x" * 10)
    first = content_digest(tmp_path)
    assert content_digest(tmp_path) == first  # stable
    (tree / "b.png").write_bytes(b"y")
    added = content_digest(tmp_path)
    (tree / "a.png").write_bytes(b"x" * 11)
    resized = content_digest(tmp_path)
    st = (tree / "a.png").stat()
    os.utime(tree / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = content_digest(tmp_path)
    assert len({first, added, resized, touched}) == 4
