"""Lookups, citation checks and retrieval quality against the real statute corpus (/work/shared/laws)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from legal_eagle.citations import StatuteBase, render_panel
from legal_eagle.citations.evaluate import evaluate, load_questions

LAWS = Path(os.environ.get("LE_TEST_LAWS_DIR", "/work/shared/laws"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LAWS.is_dir(), reason=f"statute corpus not at {LAWS}"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> StatuteBase:
    # One index per test session (about 30 s to build on 2 cores), shared by the modules that need it.
    started = time.perf_counter()
    opened = StatuteBase.open(LAWS, tmp_path_factory.getbasetemp() / "statute-index")
    assert opened is not None
    print(f"statute base opened in {time.perf_counter() - started:.1f} s")
    return opened


def test_corpus_shape_and_versions(base: StatuteBase) -> None:
    assert base.law_count == 288
    assert base.find_law("劳动合同法") == "中华人民共和国劳动合同法"
    assert base.find_law("《中华人民共和国民法典》") == "中华人民共和国民法典"
    assert base.find_law("反分裂国家法") == "反分裂国家法"  # a title without 中华人民共和国
    assert base.find_law("婚姻法") is None
    sports = base.article("体育法", 1)
    assert sports is not None and sports.version_date == "2022-06-24"  # newest of two versions
    criminal = base.article("刑法", 1)
    assert criminal is not None and criminal.version_date == "2020-12-26"  # undated file: from the header


@pytest.mark.parametrize(("law", "num", "sub", "needle"), [
    ("劳动合同法", 38, 0, "未及时足额支付劳动报酬"),
    ("民法典", 577, 0, "承担继续履行、采取补救措施或者赔偿损失等违约责任"),
    ("民法典", 1260, 0, "本法自2021年1月1日起施行"),
    ("刑法", 133, 1, "醉酒驾驶机动车"),
    ("民诉法", 22, 0, "被告住所地"),
    ("消费者权益保护法", 55, 0, "三倍"),
    ("宪法", 33, 0, "中华人民共和国公民"),
])
def test_lookups(base: StatuteBase, law: str, num: int, sub: int, needle: str) -> None:
    article = base.article(law, num, sub)
    assert article is not None and needle in article.text


def test_missing_articles(base: StatuteBase) -> None:
    assert base.article("劳动合同法", 99) is None  # the law has 98 articles
    assert base.article("民法典", 1261) is None
    assert base.article("刑法", 133, 9) is None


STATUS_CASES = [
    ("《中华人民共和国劳动合同法》第三十八条", "found"),
    ("劳动合同法第38条第1款第2项", "found"),
    ("劳动合同法第38条第9款", "no_part"),
    ("《民法典》第五百七十七条", "found"),
    ("民法典合同编第577条", "found"),
    ("刑法第一百三十三条之一", "found"),
    ("《刑法》第133条之五", "no_article"),
    ("劳动合同法第一百条", "no_article"),
    ("民法典第一千三百条", "no_article"),
    ("依据婚姻法第三十二条", "unknown_law"),
    ("《合同法》第一百零七条", "unknown_law"),
    ("《劳动合同法实施条例》第十条", "unknown_law"),
    ("劳动者可以依据劳动保护法第5条", "unknown_law"),
    ("民诉法第一百二十二条", "found"),
    ("消法第五十五条", "found"),
    ("《中华人民共和国道路交通安全法》第七十六条第一款第（二）项", "found"),
]


@pytest.mark.parametrize(("text", "status"), STATUS_CASES, ids=[c[0][:20] for c in STATUS_CASES])
def test_check_status(base: StatuteBase, text: str, status: str) -> None:
    checks = base.check(text)
    assert [c.status for c in checks] == [status]


def test_answer_check_and_panel(base: StatuteBase) -> None:
    answer = ("根据《中华人民共和国劳动合同法》第三十八条第一款第二项，用人单位未及时足额支付劳动报酬的，"
              "劳动者可以解除劳动合同，并可依照该法第四十六条要求经济补偿，标准见第四十七条。"
              "另外，《劳动合同法》第一百二十条也有规定。")
    checks = base.check(answer)
    assert [c.citation.article for c in checks] == ["第三十八条", "第四十六条", "第四十七条", "第一百二十条"]
    assert [c.ok for c in checks] == [True, True, True, False]
    sources = base.retrieve("公司拖欠工资，我可以解除劳动合同并要求经济补偿吗？", k=5)
    panel = render_panel(checks, sources)
    assert "⚠️ 未找到" in panel and "一百二十" in panel and "2012-12-28" in panel
    assert "#### 依据法条" in panel and panel.count("✅") == 3


def test_cited_set_resolves_aliases(base: StatuteBase) -> None:
    one = base.cited_set("《中华人民共和国劳动合同法》第三十八条；《中华人民共和国民事诉讼法》第一百二十二条")
    two = base.cited_set("劳动合同法第38条第1款，民诉法第122条")
    assert one == two == {("劳动合同法", "第三十八条"), ("民事诉讼法", "第一百二十二条")}


def test_lookup_is_fast(base: StatuteBase) -> None:
    text = "《劳动合同法》第三十八条、第三十九条，民法典第五百七十七条，刑法第一百三十三条之一。" * 5
    started = time.perf_counter()
    for _ in range(20):
        base.check(text)
    per_check = (time.perf_counter() - started) / 20
    print(f"check(): {per_check * 1000:.2f} ms for a 4-citation answer")
    assert per_check < 0.2


def test_concurrent_readers_agree(base: StatuteBase) -> None:
    questions = [q["question"] for q in load_questions()][:8]
    serial = {q: [a.citation for a in base.retrieve(q)] for q in questions}
    errors: list[BaseException] = []
    results: dict[str, list[str]] = {}

    def work(question: str) -> None:
        try:
            for _ in range(3):
                results[question] = [a.citation for a in base.retrieve(question)]
                assert base.check("劳动合同法第三十八条")[0].ok
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == serial


def test_retrieve_puts_articles_the_question_cites_first(base: StatuteBase) -> None:
    scored = base.retrieve_scored("劳动合同法第三十八条是什么意思？", k=3)
    assert scored[0][0].citation == "《中华人民共和国劳动合同法》第三十八条" and scored[0][1] == float("inf")
    assert len(scored) == 3 and len({a.citation for a, _ in scored}) == 3
    assert base.retrieve("今天天气怎么样", k=5, min_score=15.0) == []
    with pytest.raises(ValueError, match="min_score"):
        base.retrieve("工资", min_score=-1)


def test_eval_questions_are_valid(base: StatuteBase) -> None:
    questions = load_questions()
    assert len(questions) >= 20
    for item in questions:
        for expected in item["expected"]:
            cites = base.check(f"《{expected['law']}》{expected['article']}")
            assert cites and cites[0].ok, (item["question"], expected)


def test_retrieval_recall_at_5(base: StatuteBase) -> None:
    dev = evaluate(base, 5, load_questions("dev"))
    holdout = evaluate(base, 5, load_questions("holdout"))
    print(f"recall@5 dev {dev.recall:.3f} (n={dev.questions}), "
          f"holdout {holdout.recall:.3f} (n={holdout.questions})")
    assert dev.recall >= 0.65
    assert holdout.recall >= 0.5
