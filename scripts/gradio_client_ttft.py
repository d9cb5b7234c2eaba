"""Time to first update through the app, one session, 8 answers in a row: gradio_client as made by
default, gradio_client as the bench makes it (``bench.load.gradio_client_for``: ``ssl_verify=False``
on plain HTTP), and the page protocol. Scripted engine at 135 tokens/s: no GPU needed.

    PYTHONPATH=. python scripts/gradio_client_ttft.py
"""

from __future__ import annotations

import statistics

import httpx
from gradio_client import Client

from legal_eagle.bench import load
from legal_eagle.config import Settings
from legal_eagle.engines.base import SamplingParams
from legal_eagle.engines.fake import FakeEngine
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.app import build_app, launch_kwargs


def main() -> None:
    settings = Settings(grounding=False)
    engine = FakeEngine(script=lambda m, p: "答" * 64, delay_s=1 / 135, context_len=16384)
    demo = build_app(ModelService.ready_with(engine), settings, load_prompts())
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(demo, settings))
    params = SamplingParams(greedy=True, max_new_tokens=64)
    try:
        rows = []
        for name, client in (("gradio_client (default)", Client(url, verbose=False)),
                             ("gradio_client (ssl_verify=False)", load.gradio_client_for(url))):
            rows.append((name, [load.app_request(client, f"问题{i}", "律师", params).ttft_s for i in range(8)]))
        with httpx.Client(timeout=60) as http:
            fn = load.fn_index(http, url)
            rows.append(("page protocol", [load.page_request(http, url, fn, f"问题{i}", "律师", params,
                                                             session="tab-ttft").ttft_s for i in range(8)]))
        print("| consumer | TTFT ms (median) | TTFT ms, 8 answers |\n|---|---|---|")
        for name, times in rows:
            ms = [t * 1000 for t in times if t is not None]
            print(f"| {name} | {statistics.median(ms):.0f} | {', '.join(f'{x:.0f}' for x in ms)} |")
    finally:
        demo.close()


if __name__ == "__main__":
    main()
