"""The citation parser and numerals, on a table of citation strings (no corpus needed)."""

from __future__ import annotations

import pytest

from legal_eagle.citations.aliases import short_name
from legal_eagle.citations.numerals import article_label, cn_to_int, int_to_cn, parse_number
from legal_eagle.citations.parser import RANGE_MAX, CitationParser, cited_set, parse_citations

KNOWN = ["中华人民共和国劳动合同法", "劳动合同法", "中华人民共和国民法典", "民法典", "中华人民共和国刑法",
         "刑法", "中华人民共和国民事诉讼法", "民事诉讼法", "消费者权益保护法", "劳动法", "道路交通安全法",
         "宪法"]
PARSER = CitationParser(KNOWN)

LC = "劳动合同法"
# (text, [(law, article, 款, 项), ...]); 款/项 None when not cited.
CASES: list[tuple[str, list[tuple[str, str, int | None, int | None]]]] = [
    ("《中华人民共和国劳动合同法》第三十八条", [(LC, "第三十八条", None, None)]),
    ("劳动合同法第38条", [(LC, "第三十八条", None, None)]),
    ("《民法典》第五百七十七条", [("民法典", "第五百七十七条", None, None)]),
    ("《民法典》第577条", [("民法典", "第五百七十七条", None, None)]),
    ("依据劳动合同法第三十八条第一款第二项", [(LC, "第三十八条", 1, 2)]),
    ("《劳动合同法》第三十八条第一款第（二）项", [(LC, "第三十八条", 1, 2)]),
    ("劳动合同法第三十八条第1款第2项", [(LC, "第三十八条", 1, 2)]),
    ("劳动合同法第三十八条第二项", [(LC, "第三十八条", None, 2)]),
    ("刑法第二十条第三款", [("刑法", "第二十条", 3, None)]),
    ("劳动合同法第三十八条至第四十条", [(LC, "第三十八条", None, None), (LC, "第三十九条", None, None),
                                       (LC, "第四十条", None, None)]),
    ("劳动合同法第38-40条", [(LC, "第三十八条", None, None), (LC, "第三十九条", None, None),
                              (LC, "第四十条", None, None)]),
    ("劳动合同法第38条至40条", [(LC, "第三十八条", None, None), (LC, "第三十九条", None, None),
                                 (LC, "第四十条", None, None)]),
    ("劳动合同法第三十八条至第二十条", [(LC, "第三十八条", None, None)]),
    ("《劳动合同法》第三十八条、第三十九条",
     [(LC, "第三十八条", None, None), (LC, "第三十九条", None, None)]),
    ("劳动合同法第三十八条、三十九条和四十条",
     [(LC, "第三十八条", None, None), (LC, "第三十九条", None, None), (LC, "第四十条", None, None)]),
    ("《劳动合同法》规定了解除条件。该法第四十六条规定了经济补偿。", [(LC, "第四十六条", None, None)]),
    ("根据《劳动合同法》的规定，劳动者可以依照第三十八条解除合同。", [(LC, "第三十八条", None, None)]),
    ("劳动合同法第三十八条规定了情形。依照该法第三十九条，以及本法第四十条。",
     [(LC, "第三十八条", None, None), (LC, "第三十九条", None, None), (LC, "第四十条", None, None)]),
    ("刑法第一百三十三条之一", [("刑法", "第一百三十三条之一", None, None)]),
    ("《刑法》第133条之一", [("刑法", "第一百三十三条之一", None, None)]),
    ("《中华人民共和国刑法》第一百三十三条之1", [("刑法", "第一百三十三条之一", None, None)]),
    ("民法典合同编第五百七十七条", [("民法典", "第五百七十七条", None, None)]),
    ("《中华人民共和国民法典》第一千二百六十条", [("民法典", "第一千二百六十条", None, None)]),
    ("民法典第1087条", [("民法典", "第一千零八十七条", None, None)]),
    ("民诉法第一百二十二条", [("民事诉讼法", "第一百二十二条", None, None)]),
    ("《中华人民共和国民事诉讼法》（2021年修正）第一百二十二条",
     [("民事诉讼法", "第一百二十二条", None, None)]),
    ("消法第五十五条", [("消费者权益保护法", "第五十五条", None, None)]),
    ("《消费者权益保护法》第55条第1款", [("消费者权益保护法", "第五十五条", 1, None)]),
    ("劳动合同法第１０条", [(LC, "第十条", None, None)]),
    ("宪法第三十三条", [("宪法", "第三十三条", None, None)]),
    ("劳动合同法第一百条", [(LC, "第一百条", None, None)]),
    ("民法典第一千三百条", [("民法典", "第一千三百条", None, None)]),
    ("刑法第一百三十三条之五", [("刑法", "第一百三十三条之五", None, None)]),
    ("依据婚姻法第三十二条", [("婚姻法", "第三十二条", None, None)]),
    ("《合同法》第一百零七条", [("合同法", "第一百零七条", None, None)]),
    ("《劳动合同法实施条例》第十条", [("劳动合同法实施条例", "第十条", None, None)]),
    ("劳动者可以依据劳动保护法第5条", [("劳动保护法", "第五条", None, None)]),
    ("《最高人民法院关于审理劳动争议案件适用法律问题的解释（一）》第四十四条",
     [("最高人民法院关于审理劳动争议案件适用法律问题的解释（一）", "第四十四条", None, None)]),
    ("中华人民共和国劳动合同法第四十七条", [(LC, "第四十七条", None, None)]),
    ("《劳动合同法》第三十八条和《民法典》第五百七十七条",
     [(LC, "第三十八条", None, None), ("民法典", "第五百七十七条", None, None)]),
    ("劳动法第四十四条，劳动合同法第三十一条",
     [("劳动法", "第四十四条", None, None), (LC, "第三十一条", None, None)]),
    ("刑法第二百六十四条、第二百六十六条",
     [("刑法", "第二百六十四条", None, None), ("刑法", "第二百六十六条", None, None)]),
    ("《劳动合同法》的第三十八条", [(LC, "第三十八条", None, None)]),
    ("《中华人民共和国道路交通安全法》第七十六条第一款第（二）项", [("道路交通安全法", "第七十六条", 1, 2)]),
    ("《劳动合同法》第三十八条。再说一次，《劳动合同法》第三十八条。", [(LC, "第三十八条", None, None)]),
    ("依照第三十八条规定处理。", []),
    ("根据相关法律规定第十条", []),
    ("按照上述规定第五条处理", []),
    ("《劳动合同》第三条约定了工作内容。", []),
    ("《关于修改〈中华人民共和国文物保护法〉第三十一条的决定》", []),
    ("他是第一个到的，排在第三条队伍里。", []),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:24] for c in CASES])
def test_parser_table(text: str, expected: list[tuple[str, str, int | None, int | None]]) -> None:
    got = [(c.law, c.article, c.kuan, c.xiang) for c in PARSER.parse(text)]
    assert got == expected


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40


def test_via_records_how_the_law_was_found() -> None:
    cites = PARSER.parse("《劳动合同法》第三十八条。该法第三十九条。另见第四十条。")
    assert [c.via for c in cites] == ["explicit", "reference", "context"]
    assert cites[0].raw == "第三十八条" and cites[0].start == len("《劳动合同法》")


def test_bare_article_needs_a_nearby_law() -> None:
    assert PARSER.parse("《劳动合同法》规定了很多。" + "这" * 400 + "第三十八条") == []
    assert PARSER.parse("根据《劳动合同法》，我有三点建议。第二条建议是尽快申请仲裁。") == []
    quoted = PARSER.parse("《劳动合同法》规定：\n\n第三十八条：用人单位……")
    assert [c.article for c in quoted] == ["第三十八条"]


def test_long_range_is_capped() -> None:
    cites = PARSER.parse("民法典第一条至第一千二百六十条")
    assert len(cites) == RANGE_MAX + 1
    assert cites[-1].article == "第一千二百六十条"


def test_default_parser_finds_unbracketed_names_by_suffix() -> None:
    assert cited_set("依照中华人民共和国劳动合同法第三十八条和民法典第五百七十七条") == {
        ("劳动合同法", "第三十八条"), ("民法典", "第五百七十七条")}
    assert parse_citations("没有任何法条。") == []


def test_cited_set_drops_paragraphs_and_dedupes() -> None:
    text = "劳动合同法第三十八条第一款第二项；劳动合同法第38条第二款"
    assert cited_set(text, PARSER) == {(LC, "第三十八条")}


@pytest.mark.parametrize(("text", "value"), [
    ("一", 1), ("十", 10), ("十二", 12), ("二十", 20), ("一百零一", 101), ("一百一十", 110), ("二百十", 210),
    ("一千零一十", 1010), ("一千二百六十", 1260), ("两百", 200), ("一〇八", 108), ("一万零五", 10005)])
def test_cn_to_int(text: str, value: int) -> None:
    assert cn_to_int(text) == value


def test_int_to_cn_round_trips() -> None:
    for n in range(0, 3000):
        assert cn_to_int(int_to_cn(n)) == n
    assert int_to_cn(1087) == "一千零八十七" and int_to_cn(10) == "十" and int_to_cn(110) == "一百一十"
    assert article_label(133, 1) == "第一百三十三条之一"


def test_numeral_errors() -> None:
    assert parse_number("３８") == 38
    with pytest.raises(ValueError):
        cn_to_int("三十x")
    with pytest.raises(ValueError, match="0-99999"):
        int_to_cn(100000)


@pytest.mark.parametrize(("raw", "short"), [
    ("《中华人民共和国民法典》", "民法典"), ("民诉法", "民事诉讼法"),
    ("劳动合同法（2012年修正）", "劳动合同法"), ("民法典婚姻家庭编", "民法典"),
    ("中华人民共和国", "中华人民共和国")])
def test_short_name(raw: str, short: str) -> None:
    assert short_name(raw) == short
