"""``python -m legal_eagle.bench``: raw TurboMind vs the running app, side by side, in one run.

    cli.py       options; runs the parts as child processes; prints and writes the report
    child.py     one part in a child process (one engine per process), its JSON back
    parts.py     GPU parts: serve (raw vs app vs pipe), prefix, kv8g, tune; consumers of the app
    start.py     random 7B-shaped weights, quick AWQ, cold start, warm start
    load.py      load drivers: N simultaneous users against an engine or against the app
    report.py    pure: request summaries, aggregate throughput, targets PASS/FAIL
    markdown.py  the tables and the replaceable section of docs/benchmarks.md

Nothing heavy is imported here; torch and lmdeploy load inside the GPU parts only.
"""
