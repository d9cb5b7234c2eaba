"""Entry point: ``python -m legal_eagle.bench --help``."""

from legal_eagle.bench.cli import main

raise SystemExit(main())
