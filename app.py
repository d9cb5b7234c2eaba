"""Legal-Eagle: ``python app.py`` serves the Chinese legal consultation app.

Reads settings (flags over ``LE_*`` environment variables), starts preparing the model in
the background (download, first-start AWQ quantization, loading) and serves the page at
once; the page shows the progress and becomes usable when the model is ready.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from legal_eagle.config import Settings
from legal_eagle.errors import LegalEagleError
from legal_eagle.loader import load_engine
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.app import build_app, launch_kwargs


def main(argv: list[str] | None = None) -> int:
    """Run the app until interrupted; returns the process exit code."""
    try:
        settings = Settings.load(sys.argv[1:] if argv is None else argv, os.environ)
        prompts = load_prompts(Path(settings.prompts_dir) if settings.prompts_dir else None)
    except ValueError as exc:
        print(f"配置错误 / invalid setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = ModelService(lambda progress: load_engine(settings, progress), name="chat")
    service.start()
    demo = build_app(service, settings, prompts)
    try:
        demo.launch(**launch_kwargs(settings, {"chat": service}))  # type: ignore[arg-type]
    except LegalEagleError as exc:
        print(exc.user_message, file=sys.stderr)
        return 1
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
