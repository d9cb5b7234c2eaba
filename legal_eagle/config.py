"""One frozen ``Settings``: the only place that reads environment variables and argv.

Every option has a CLI flag (spelled as LMDeploy spells it where the two overlap) and an
environment variable ``LE_<NAME>``; a flag wins over the environment, which wins over the
default. ``python app.py --help`` lists them all.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from legal_eagle import MODEL_ID
from legal_eagle.calibration import CalibrationSpec

BACKENDS = ("auto", "turbomind", "transformers", "remote", "fake")
MODEL_FORMATS = ("awq", "hf", "fp8")
QUANT_POLICIES = (0, 4, 8)
CACHE_GENERATION = ("all", "auto", "none")  # LMDeploy TurbomindEngineConfig.cache_generation


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "legal-eagle")


@dataclass(frozen=True)
class Option:
    """How one setting is spelled on the command line and in the environment."""

    name: str
    type: type
    help: str
    choices: tuple[Any, ...] | None = None
    env_extra: tuple[str, ...] = ()  # other variables read after LE_<NAME> (e.g. platform ones)


OPTIONS: tuple[Option, ...] = (
    Option("model_path", str,
           "ModelScope model id or a local directory with the model (InternLM2 or Llama format)"),
    Option("revision", str, "ModelScope revision (branch or tag) of --model-path"),
    Option("backend", str, "engine: auto = turbomind when an NVIDIA GPU is usable, else transformers",
           BACKENDS),
    Option("model_format", str,
           "awq = 4-bit AWQ W4A16 (made on first start), hf = fp16 weights as downloaded, fp8 = 8-bit FP8 "
           "weights (made on first start; GPUs of compute capability 8.9+ such as L4/L40/H100: faster than fp16 "
           "there, half its weight memory)", MODEL_FORMATS),
    Option("cache_dir", str, "where converted/quantized models and indexes live "
           "(default ~/.cache/legal-eagle)"),
    Option("calibration", str, "AWQ calibration text: builtin (the shipped Chinese legal Q&A), none "
           "(data-free round-to-nearest) or the path of a UTF-8 text file (问：/答： pairs or plain text)"),
    Option("min_agreement", float, "publish the 4-bit copy only if it picks the fp16 model's next token at "
           "least this often on legal prompts (0..1; 0 skips the gate, e.g. for random test weights)"),
    Option("session_len", int, "context window in tokens (prompt + answer) per conversation"),
    Option("cache_max_entry_count", float,
           "share of FREE GPU memory (after weights) that TurboMind's KV cache takes, 0.01-0.95"),
    Option("quant_policy", int, "KV-cache quantization: 0 = fp16, 4 = int4, 8 = int8", QUANT_POLICIES),
    Option("max_batch_size", int, "most requests TurboMind decodes at once"),
    Option("tp", int, "number of GPUs to split the model over (tensor parallelism)"),
    Option("enable_prefix_caching", bool, "reuse the KV cache of a conversation's history"),
    Option("cache_generation", str, "with prefix caching: all = also cache the answer's last, partly filled "
           "KV block (the next turn computes only its new question), auto = whole blocks only, none = no "
           "answer blocks", CACHE_GENERATION),
    Option("host", str, "address to listen on (0.0.0.0 to serve other machines)",
           env_extra=("GRADIO_SERVER_NAME",)),
    Option("port", int, "port to listen on", env_extra=("GRADIO_SERVER_PORT", "PORT")),
    Option("concurrency_limit", int, "chat answers generated at the same time (others queue)"),
    Option("max_queue_size", int, "requests that may wait in the queue before new ones are refused"),
    Option("max_input_chars", int, "longest question accepted, in characters"),
    Option("max_new_tokens", int, "default answer length limit in tokens"),
    Option("max_new_tokens_cap", int, "the largest answer length a user may choose"),
    Option("temperature", float, "default sampling temperature"),
    Option("top_p", float, "default nucleus sampling top_p"),
    Option("repetition_penalty", float, "default repetition penalty"),
    Option("prompts_dir", str, "folder with persona.md, disclaimer.md, examples.txt "
           "(default: the project's prompts/)"),
    Option("laws_dir", str, "statute corpus folder (default <cache_dir>/laws)"),
    Option("remote_url", str, "with --backend remote: an LMDeploy api_server or proxy, e.g. http://127.0.0.1:23333"),
    Option("api_key", str, "with --backend remote: the key the server was started with (--api-keys)"),
    Option("auth", str, "login for the page and its API: user:password[,user2:password2] (default: none; "
           "GET /healthz stays open for probes)"),
    Option("compare_pause_chat", bool, "on a GPU too small for the fp16 and the 4-bit model together (24 GB), "
           "let a comparison close the chat model for its fp16 half (chat answers wait about a minute)"),
    Option("grounding", bool, "give the model the 5 statute articles most relevant to each question "
           "(as reference data) and list them under the answer; needs the statute base"),
    Option("log_user_text", bool, "log users' questions at INFO (off: legal questions are private)"),
    Option("log_level", str, "logging level", ("DEBUG", "INFO", "WARNING", "ERROR")),
)


@dataclass(frozen=True)
class Settings:
    """All settings of one app run. Build with ``Settings.load`` (or directly in tests)."""

    model_path: str = MODEL_ID
    revision: str = "master"
    backend: str = "auto"
    model_format: str = "awq"
    cache_dir: str | None = None
    calibration: str = "builtin"
    min_agreement: float = 0.85
    session_len: int = 8192
    cache_max_entry_count: float = 0.5
    quant_policy: int = 0
    max_batch_size: int = 32
    tp: int = 1
    enable_prefix_caching: bool = True
    cache_generation: str = "all"
    host: str = "127.0.0.1"
    port: int = 7860
    concurrency_limit: int = 32  # = TurboMind max_batch_size: every admitted answer decodes in the same batch
    max_queue_size: int = 64
    max_input_chars: int = 4000
    max_new_tokens: int = 1024
    max_new_tokens_cap: int = 4096
    temperature: float = 0.7
    top_p: float = 0.8
    repetition_penalty: float = 1.005
    prompts_dir: str | None = None
    laws_dir: str | None = None
    remote_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    auth: str | None = field(default=None, repr=False)  # passwords stay out of logs
    compare_pause_chat: bool = True
    grounding: bool = True
    log_user_text: bool = False
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _check_range("session_len", self.session_len, 256, 1_048_576)
        _check_range("min_agreement", self.min_agreement, 0.0, 1.0)
        self.calibration_spec()  # raises ValueError for a missing calibration file
        _check_range("cache_max_entry_count", self.cache_max_entry_count, 0.01, 0.95)
        _check_range("max_batch_size", self.max_batch_size, 1, 1024)
        _check_range("tp", self.tp, 1, 64)
        _check_range("port", self.port, 0, 65535)
        _check_range("concurrency_limit", self.concurrency_limit, 1, 1024)
        _check_range("max_queue_size", self.max_queue_size, 1, 100_000)
        _check_range("max_input_chars", self.max_input_chars, 1, 100_000)
        _check_range("max_new_tokens_cap", self.max_new_tokens_cap, 1, self.session_len)
        _check_range("max_new_tokens", self.max_new_tokens, 1, self.max_new_tokens_cap)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.01, 1.0)
        _check_range("repetition_penalty", self.repetition_penalty, 1.0, 2.0)
        parse_auth(self.auth)  # raises ValueError with the expected form
        if self.backend == "remote" and not self.remote_url:
            raise ValueError("backend remote needs --remote-url (LE_REMOTE_URL), e.g. http://127.0.0.1:23333")
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.choices is not None and value not in option.choices:
                raise ValueError(f"{option.name} must be one of {list(option.choices)}, got {value!r}")

    @property
    def cache_path(self) -> Path:
        """Resolved cache directory."""
        return Path(self.cache_dir or _default_cache_dir()).expanduser()

    def calibration_spec(self) -> CalibrationSpec:
        """The AWQ calibration this run asks for (``builtin``, ``none`` or a text file)."""
        if self.calibration in ("builtin", "none"):
            return CalibrationSpec(source=self.calibration)  # type: ignore[arg-type]
        path = Path(self.calibration).expanduser()
        if not path.is_file():
            raise ValueError(f"calibration must be builtin, none or an existing text file, got {self.calibration!r}")
        return CalibrationSpec(source="file", path=path)

    @property
    def gemm_tuning_path(self) -> Path:
        """Where TurboMind's GEMM tuning files live (``gemm_tuning``); delete it to tune again."""
        return self.cache_path / "turbomind-gemm"

    @property
    def laws_path(self) -> Path:
        """Resolved statute corpus directory."""
        return Path(self.laws_dir).expanduser() if self.laws_dir else self.cache_path / "laws"

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from flags over environment over defaults.

        Args:
            argv: command-line arguments without the program name (default: none).
            environ: environment variables (default: none, so tests stay hermetic;
                ``app.py`` passes ``os.environ``).

        Returns:
            The validated settings.

        Raises:
            ValueError: a value is malformed or out of its allowed range.
            SystemExit: from argparse, for ``--help`` or an unknown flag.
        """
        values: dict[str, Any] = {}
        env = environ or {}
        for option in OPTIONS:
            for var in (f"LE_{option.name.upper()}", *option.env_extra):
                if env.get(var, "").strip():
                    values[option.name] = _parse(option, env[var].strip(), var)
                    break
        args = build_parser().parse_args(list(argv or []))
        for option in OPTIONS:
            value = getattr(args, option.name)
            if value is not None:
                values[option.name] = value
        return cls(**values)

    def public_dict(self) -> dict[str, Any]:
        """The settings as a dict (for exports and the status line)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_parser() -> argparse.ArgumentParser:
    """The ``--help``-documented parser; every default shown is the built-in one."""
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Legal-Eagle: 中文法律咨询演示 (Chinese legal consultation demo). "
        "Every flag can also be set as an environment variable LE_<FLAG> (e.g. LE_MODEL_PATH).",
    )
    for option in OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        default = Settings.__dataclass_fields__[option.name].default
        help_text = f"{option.help} [env LE_{option.name.upper()}; default: {default}]"
        if option.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=option.type, choices=option.choices, default=None,
                                help=help_text, metavar=option.name.upper())
    return parser


def _parse(option: Option, raw: str, var: str) -> Any:
    """Convert an environment string to the option's type, or explain what is wrong."""
    if option.type is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{var} must be true/false (1/0, yes/no, on/off), got {raw!r}")
    try:
        return option.type(raw)
    except ValueError:
        raise ValueError(f"{var} must be a {option.type.__name__}, got {raw!r}") from None


def _check_range(name: str, value: float, low: float, high: float) -> None:
    """Raise ValueError unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """``"user:password,user2:pass2"`` → ``[("user", "password"), ("user2", "pass2")]``.

    The first ``:`` of each pair separates name and password, so passwords may contain ``:``
    but not ``,``. Empty or None means no login.

    Raises:
        ValueError: a pair without ``:``, an empty name or password, or a name given twice.
    """
    if spec is None or not spec.strip():
        return None
    pairs: list[tuple[str, str]] = []
    for number, item in enumerate(spec.split(","), start=1):
        user, sep, password = item.strip().partition(":")
        user = user.strip()
        if not sep or not user or not password:
            raise ValueError(f"auth entry {number} must look like user:password (pairs separated by commas), "
                             f"got {'an empty entry' if not item.strip() else repr(user + sep + '***')}")
        if any(user == u for u, _ in pairs):
            raise ValueError(f"auth user {user!r} is given twice")
        pairs.append((user, password))
    return pairs


class _AppLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr handler of the app's log.

    A subclass on purpose: LMDeploy's ``get_logger`` sets every root handler whose type *is*
    ``logging.StreamHandler`` to ERROR (to avoid duplicate lines), which silenced all of the
    app's INFO progress from the first ``lmdeploy`` import on (first-start AWQ, loading).
    """


def configure_logging(level: str) -> None:
    """The app's log: ``level`` and up, to stderr, immune to LMDeploy's handler muting."""
    handler = _AppLogHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
