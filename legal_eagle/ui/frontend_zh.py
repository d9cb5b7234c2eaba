"""Chinese for the few messages that Gradio's page writes in English whatever the language.

Gradio 6.31's frontend has these as constants in its client code, not in its zh-CN strings:
a full queue (HTTP 503 on ``queue/join``) shows "This application is currently busy. Please try
again." The page runs ``JS`` once loaded: it watches the page and rewrites those texts in place
(the toast keeps its place and colour; the question stays in its box, as nothing was sent), and
the heading "Error" of a toast, which its zh-CN strings leave in English.
"""

from __future__ import annotations

import json

ZH = {
    "This application is currently busy. Please try again.":
        "当前咨询的人较多，排队已满，请稍候片刻再发送（您的问题仍保留在输入框中）。",
    "Connection errored out.": "与服务器的连接中断了，请检查网络或刷新页面后重试。",
}

JS = r"""() => {
  const zh = ZH_TABLE;
  const fix = (root) => {
    if (!root) return;
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const [en, cn] of Object.entries(zh)) {
        if (node.nodeValue.includes(en)) node.nodeValue = node.nodeValue.replace(en, cn);
      }
      const title = node.nodeValue.match(/^\s*Error(\s*\(\d+\))?\s*$/);  // a toast's heading only
      if (title && node.parentElement && node.parentElement.closest('[class*="toast"]')) {
        node.nodeValue = "错误" + (title[1] || "");
      }
    }
  };
  new MutationObserver((changes) => {
    for (const change of changes) {
      if (change.type === "characterData") fix(change.target.parentNode);
      change.addedNodes.forEach((node) => fix(node.nodeType === Node.TEXT_NODE ? node.parentNode : node));
    }
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
  fix(document.body);
}""".replace("ZH_TABLE", json.dumps(ZH, ensure_ascii=False))
