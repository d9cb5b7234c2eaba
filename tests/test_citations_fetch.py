"""The corpus download: a fake opener or a file:// zip, never the network."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import BinaryIO

import pytest

from legal_eagle.citations import fetch
from legal_eagle.citations.fetch import fetch_laws

PREFIX = "Legal-Eagle-InternLM-3521219abcdef/Retrieval-Augmented Generation/laws/"


def make_zip(path: Path, files: dict[str, str]) -> Path:
    """A repository-archive-like zip with ``files`` (archive names → text)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Legal-Eagle-InternLM-3521219abcdef/README.md", "readme")
        zf.writestr("Legal-Eagle-InternLM-3521219abcdef/Retrieval-Augmented Generation/rag/LLM.py", "code")
        for name, text in files.items():
            zf.writestr(name, text)
    return path


BODY = "\n\n<!-- INFO END -->\n\n第一条 内容。\n"
LAWS = {
    PREFIX + "6-社会法/劳动合同法（2012-12-28）.md": "# 中华人民共和国劳动合同法" + BODY,
    PREFIX + "7-刑法/刑法.md": "# 中华人民共和国刑法" + BODY,
}


def test_fetch_with_injected_opener(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", LAWS).read_bytes()
    calls: list[str] = []

    def opener(url: str) -> BinaryIO:
        calls.append(url)
        return io.BytesIO(archive)

    dest = tmp_path / "cache" / "laws"
    assert fetch_laws(dest, opener=opener, min_files=2) == dest
    assert calls == [fetch.ARCHIVE_URL]
    labor = dest / "6-社会法" / "劳动合同法（2012-12-28）.md"
    assert labor.read_text(encoding="utf-8").startswith("# 中华")
    assert (dest / "7-刑法" / "刑法.md").exists() and not (dest / "README.md").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["laws"]  # no temporary folder left
    # Already there: nothing downloaded without force.
    assert fetch_laws(dest, opener=opener, min_files=2) == dest and len(calls) == 1


def test_fetch_from_file_url_replaces_atomically(tmp_path: Path) -> None:
    dest = tmp_path / "laws"
    dest.mkdir()
    (dest / "old.md").write_text("# 旧法\n", encoding="utf-8")
    url = make_zip(tmp_path / "a.zip", LAWS).as_uri()
    fetch_laws(dest, url=url, force=True, min_files=2)
    assert sorted(p.name for p in dest.rglob("*.md")) == ["刑法.md", "劳动合同法（2012-12-28）.md"]


@pytest.mark.parametrize(("files", "match"), [
    ({"Legal-Eagle-InternLM-x/other/a.md": "# x\n"}, "0 law files"),
    ({PREFIX + "../evil.md": "# x\n"}, "unsafe path"),
])
def test_bad_archives_keep_the_old_corpus(tmp_path: Path, files: dict[str, str], match: str) -> None:
    dest = tmp_path / "laws"
    dest.mkdir()
    (dest / "old.md").write_text("# 旧法\n", encoding="utf-8")
    url = make_zip(tmp_path / "bad.zip", files).as_uri()
    with pytest.raises(ValueError, match=match):
        fetch_laws(dest, url=url, force=True, min_files=1)
    assert [p.name for p in dest.iterdir()] == ["old.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "laws"]


def test_too_few_files_and_bad_zip(tmp_path: Path) -> None:
    url = make_zip(tmp_path / "a.zip", LAWS).as_uri()
    with pytest.raises(ValueError, match="at least 200"):
        fetch_laws(tmp_path / "laws", url=url)
    assert not (tmp_path / "laws").exists()
    with pytest.raises(zipfile.BadZipFile):
        fetch_laws(tmp_path / "laws", opener=lambda url: io.BytesIO(b"not a zip"), min_files=1)
    with pytest.raises(ValueError, match="1-100000"):
        fetch_laws(tmp_path / "laws", min_files=0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = make_zip(tmp_path / "a.zip", LAWS).as_uri()
    assert fetch.main(["--dest", str(tmp_path / "laws"), "--url", url]) == 1  # 2 files < the default 200
    assert "at least 200" in capsys.readouterr().err
    assert fetch.main(["--dest", str(tmp_path / "laws"), "--url", url, "--min-files", "2"]) == 0
    assert "2 部法律" in capsys.readouterr().out
    assert fetch.main(["--dest", str(tmp_path / "x"), "--url", (tmp_path / "missing.zip").as_uri()]) == 1
    assert "下载法律条文库失败" in capsys.readouterr().err
