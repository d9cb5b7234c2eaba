"""Word segmentation for BM25: a private jieba tokenizer that knows the law names."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

TOKENIZER_VERSION = "jieba-search-1"
"""Changes whenever tokenization changes, so a stored index built another way is rebuilt."""

STOPWORDS = frozenset((
    "的", "了", "和", "与", "及", "或", "是", "在", "我", "你", "他", "她", "它", "我们",
    "你们", "他们", "吗", "呢", "吧", "啊", "呀", "么", "怎么", "怎么办", "怎样", "什么", "如何", "哪些",
    "可以", "能", "能否", "能不能", "是否", "会", "要", "想", "请问", "请", "一个", "这个", "那个", "这",
    "那", "如果", "但是", "但", "因为", "所以", "就", "都", "也", "还", "被", "把", "给", "对",
    "从", "向", "于", "以", "其", "之", "者", "等", "有", "没有", "没", "不", "已经", "现在",
    "时候", "情况", "问题", "应该", "需要", "一下", "谢谢", "他人", "自己", "本", "该", "此", "该法", "本法",
))
_KEEP = re.compile(r"[\u4e00-\u9fff0-9A-Za-z]")

LEGAL_WORDS = (
    "用人单位", "劳动者", "劳动合同", "经济补偿", "劳动报酬", "试用期", "竞业限制", "违约金",
    "定金", "诉讼时效", "夫妻共同财产", "共同财产", "离婚", "抚养费", "法定继承", "遗嘱",
    "遗产", "优先购买权", "承租人", "出租人", "租赁合同", "借款合同", "利息", "民间借贷",
    "正当防卫", "紧急避险", "醉酒驾驶", "盗窃", "诈骗", "故意伤害", "交通事故", "机动车",
    "非机动车", "消费者", "经营者", "欺诈", "无理由退货", "个人信息", "高空抛物", "饲养动物",
    "侵权责任", "精神损害", "民事行为能力", "监护人", "管辖", "上诉", "仲裁", "劳动争议",
)


class Tokenizer:
    """jieba in search mode with the law names and some legal words added; safe to share between threads."""

    def __init__(self, extra_words: Iterable[str] = ()) -> None:
        self._extra = tuple(dict.fromkeys((*LEGAL_WORDS, *extra_words)))
        self._jieba: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        """The initialised private jieba tokenizer (created on first use; jieba imported lazily)."""
        if self._jieba is None:
            with self._lock:
                if self._jieba is None:
                    import jieba

                    jieba.setLogLevel(60)  # silence its "Building prefix dict" prints
                    tok = jieba.Tokenizer()
                    tok.initialize()
                    for word in self._extra:
                        tok.add_word(word, freq=20000)
                    self._jieba = tok
        return self._jieba

    def add_words(self, words: Iterable[str]) -> None:
        """Teach the tokenizer more words (law names); call before sharing it between threads."""
        with self._lock:
            new = tuple(w for w in words if w not in self._extra)
            self._extra += new
            if self._jieba is not None:
                for word in new:
                    self._jieba.add_word(word, freq=20000)

    def tokens(self, text: str) -> list[str]:
        """Search-mode words of ``text`` without punctuation and stop words.

        Args:
            text: any Chinese text.

        Returns:
            The words, repeats kept (BM25 counts them).
        """
        words = self._get().cut_for_search(text)
        return [w for w in (w.strip().lower() for w in words) if w and _KEEP.search(w) and w not in STOPWORDS]
