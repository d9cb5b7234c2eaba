#!/usr/bin/env python3
"""The app's serving cost without a GPU: raw engine vs the app (gradio_client and page protocol).

A scripted engine streams at a fixed speed (default 130 tok/s per answer, a 4-bit 7B on one
GPU), so that whatever the app and Gradio add shows up as lost throughput::

    python3 scripts/cpu_app_load.py --levels 1,8,32 [--concurrency-limit 32] [--tok-s 130]

Consumers run in child processes as in ``python -m legal_eagle.bench``. Figures from the
2-core development machine are in docs/benchmarks.md (target 2).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from legal_eagle.bench import load  # noqa: E402
from legal_eagle.bench.child import process_consumers  # noqa: E402
from legal_eagle.config import Settings  # noqa: E402
from legal_eagle.engines.base import SamplingParams  # noqa: E402
from legal_eagle.engines.fake import FakeEngine  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--concurrency-limit", type=int, default=Settings().concurrency_limit)
    p.add_argument("--tok-s", type=float, default=130.0, help="the scripted engine's speed per answer")
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    text = "根据劳动合同法第三十八条" * (args.tokens // 10 + 1)
    engine = FakeEngine(script=lambda messages, params: text, delay_s=1 / args.tok_s)
    settings = Settings(host="127.0.0.1", port=load.free_port(), concurrency_limit=args.concurrency_limit)
    out = load.compare(engine, settings, questions=["公司拖欠工资怎么办？", "房东不退押金怎么办？"], persona="律师",
                       params=SamplingParams(max_new_tokens=args.tokens, greedy=True), levels=levels,
                       rounds={1: 2}, consumers=process_consumers,
                       page=functools.partial(process_consumers, kind="page"))
    print(f"| consumers | users | TTFT ms | decode tok/s per user | aggregate tok/s |  (concurrency_limit "
          f"{args.concurrency_limit})")
    for side in ("raw", "app", "page"):
        for users, s in out[side].items():
            print(f"| {side} | {users} | {s['ttft_ms_mean'] or 0:.0f} | {s['decode_tok_s_mean'] or 0:.1f} "
                  f"| {s['agg_tok_s'] or 0:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
