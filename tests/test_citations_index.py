"""Corpus reading, the SQLite index's build-once/rebuild-on-change rule and StatuteBase on a tiny corpus."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from legal_eagle.citations import MISSING_NOTICE, StatuteBase
from legal_eagle.citations.corpus import fingerprint, read_law
from legal_eagle.citations.index import index_path

LABOR = """# 中华人民共和国劳动合同法

2007年6月29日 第十届全国人民代表大会常务委员会第二十八次会议通过

2012年12月28日 第十一届全国人大常委会第三十次会议《关于修改<中华人民共和国劳动合同法>第三条的决定》修正

<!-- INFO END -->

## 第一章 总则

第一条 为了完善劳动合同制度，制定本法。

第二条 用人单位与劳动者建立劳动关系，适用本法。

## 第四章 劳动合同的解除和终止

第三十八条 用人单位有下列情形之一的，劳动者可以解除劳动合同:

（一）未按照劳动合同约定提供劳动保护或者劳动条件的；

（二）未及时足额支付劳动报酬的；

用人单位以暴力手段强迫劳动者劳动的，劳动者可以立即解除劳动合同。

第三十九条 劳动者在试用期间被证明不符合录用条件的，用人单位可以解除劳动合同。

第三十九条 重复的条文。
"""

CRIMINAL = """# 中华人民共和国刑法

1979年7月1日 第五届全国人民代表大会第二次会议通过

2020年12月26日 第十三届全国人民代表大会常务委员会第二十四次会议通过的《中华人民共和国刑法修正案（十一）》

<!-- INFO END -->

## 第二编 分则

第一百三十三条 违反交通运输管理法规，因而发生重大事故的，处三年以下有期徒刑。

第一百三十三条之一 在道路上驾驶机动车，醉酒驾驶机动车的，处拘役，并处罚金。

第一百三十四 条在生产、作业中违反有关安全管理的规定，处三年以下有期徒刑。
"""


def make_corpus(root: Path) -> Path:
    """A two-law corpus in the real layout (category folders, dated and undated file names)."""
    (root / "6-社会法").mkdir(parents=True)
    (root / "7-刑法").mkdir()
    (root / "6-社会法" / "劳动合同法（2012-12-28）.md").write_text(LABOR, encoding="utf-8")
    (root / "7-刑法" / "刑法.md").write_text(CRIMINAL, encoding="utf-8")
    (root / "SOURCE.md").write_text("# not a law\n", encoding="utf-8")
    return root


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "laws")


def test_read_law_parses_articles_dates_and_chapters(corpus: Path) -> None:
    law = read_law(corpus / "7-刑法" / "刑法.md", corpus)
    assert law.title == "中华人民共和国刑法" and law.short == "刑法" and law.category == "7-刑法"
    assert law.version_date == "2020-12-26"  # undated file name: newest date in the header
    assert [(a.num, a.sub) for a in law.articles] == [(133, 0), (133, 1), (134, 0)]
    assert law.articles[2].text.startswith("第一百三十四条 在生产")  # "第一百三十四 条在" normalised
    assert law.articles[1].chapter == "第二编 分则"
    labor = read_law(corpus / "6-社会法" / "劳动合同法（2012-12-28）.md", corpus)
    assert labor.version_date == "2012-12-28"
    art38 = next(a for a in labor.articles if a.num == 38)
    assert art38.text.count("\n") == 3 and art38.chapter == "第四章 劳动合同的解除和终止"
    assert not any(a.num == 3 for a in labor.articles)  # 第三条 inside the header is not an article


def test_open_returns_none_without_corpus(tmp_path: Path) -> None:
    assert StatuteBase.open(tmp_path / "missing", tmp_path / "idx") is None
    (tmp_path / "empty").mkdir()
    assert StatuteBase.open(tmp_path / "empty", tmp_path / "idx") is None
    assert "python -m legal_eagle.citations.fetch" in MISSING_NOTICE


def test_index_is_built_once_and_rebuilt_when_the_corpus_changes(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    base = StatuteBase.open(corpus, idx)
    assert base is not None and base.law_count == 2
    first = base.index_file
    assert first == index_path(corpus, idx) and first.exists()
    mtime = first.stat().st_mtime_ns
    again = StatuteBase.open(corpus, idx)
    assert again is not None and again.index_file == first and first.stat().st_mtime_ns == mtime

    old_print = fingerprint(corpus)
    law = corpus / "7-刑法" / "刑法.md"
    law.write_text(CRIMINAL + "\n第一百三十五条 新增的条文。\n", encoding="utf-8")
    os.utime(law, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fingerprint(corpus) != old_print
    rebuilt = StatuteBase.open(corpus, idx)
    assert rebuilt is not None and rebuilt.index_file != first
    assert not first.exists()  # the stale index was removed
    assert rebuilt.article("刑法", 135) is not None and base.article("刑法", 135) is None


def test_checks_on_tiny_corpus(corpus: Path, tmp_path: Path) -> None:
    base = StatuteBase.open(corpus, tmp_path / "idx")
    assert base is not None
    checks = base.check("依据《劳动合同法》第三十八条第一款第二项和第三十八条第五项，以及刑法第133条之一、"
                        "刑法第二百条、婚姻法第三十二条。")
    got = [(c.display, c.status) for c in checks]
    assert got == [
        ("《中华人民共和国劳动合同法》第三十八条第一款第二项", "found"),
        ("《中华人民共和国劳动合同法》第三十八条第五项", "no_part"),
        ("《中华人民共和国刑法》第一百三十三条之一", "found"),
        ("《中华人民共和国刑法》第二百条", "no_article"),
        ("《婚姻法》第三十二条", "unknown_law"),
    ]
    assert checks[0].excerpt == "（二）未及时足额支付劳动报酬的；"
    assert checks[2].version_date == "2020-12-26"
    assert "一百三十四" in checks[3].note and "民法典" in checks[4].note
    dup = base.article("劳动合同法", 39)
    assert dup is not None and "试用期" in dup.text  # duplicate numbering: the first one is kept


def test_retrieval_on_tiny_corpus(corpus: Path, tmp_path: Path) -> None:
    base = StatuteBase.open(corpus, tmp_path / "idx")
    assert base is not None
    top = base.retrieve("喝醉酒开车会被判刑吗", k=2)
    assert top[0].label == "第一百三十三条之一" and top[0].law_short == "刑法"
    assert base.retrieve("公司拖欠工资我能解除劳动合同吗", k=1)[0].label == "第三十八条"
    assert base.retrieve("？？？", k=3) == []
    with pytest.raises(ValueError, match="1 and 50"):
        base.retrieve("工资", k=0)
