"""Legal-Eagle: ``python app.py`` serves the Chinese legal consultation app.

Reads settings (flags over ``LE_*`` environment variables), starts preparing the model in
the background (download, first-start AWQ quantization, loading) and serves the page at
once; the page shows the progress and becomes usable when the model is ready.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from legal_eagle.citations import StatuteBase
from legal_eagle.config import Settings, configure_logging
from legal_eagle.errors import LegalEagleError
from legal_eagle.loader import Checkpoints, comparison_provider, load_engine
from legal_eagle.prompts import load_prompts
from legal_eagle.service import ModelService
from legal_eagle.ui.app import build_app, launch_kwargs


def _log_statute_failure(future: Future[StatuteBase | None]) -> None:
    """The 法条 panel tells users to see the log when the statute index cannot be opened: log why."""
    if future.exception() is not None:
        logging.getLogger("legal_eagle.citations").error("statute base failed to open; citation features off",
                                                         exc_info=future.exception())


def main(argv: list[str] | None = None) -> int:
    """Run the app until interrupted; returns the process exit code."""
    try:
        settings = Settings.load(sys.argv[1:] if argv is None else argv, os.environ)
        prompts = load_prompts(Path(settings.prompts_dir) if settings.prompts_dir else None)
    except ValueError as exc:
        print(f"配置错误 / invalid setting: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    checkpoints = Checkpoints()  # the 4-bit and fp16 directories, once prepared (for the comparison tab)
    service = ModelService(lambda progress: load_engine(settings, progress, checkpoints), name="chat")
    comparison = comparison_provider(settings, service, checkpoints)
    service.start()
    with ThreadPoolExecutor(1, thread_name_prefix="statutes") as pool:  # index built once, ~20 s, off the page
        statutes = pool.submit(StatuteBase.open, settings.laws_path, settings.cache_path / "citations")
        statutes.add_done_callback(_log_statute_failure)
        demo = build_app(service, settings, prompts, statutes, comparison)
        try:
            demo.launch(**launch_kwargs(demo, settings, {"chat": service}))  # type: ignore[arg-type]
        except LegalEagleError as exc:
            print(exc.user_message, file=sys.stderr)
            return 1
        finally:
            close = getattr(comparison, "close", None)
            if close is not None:
                close()  # the fp16 engine, if loaded
            service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
