"""Settings: flags over environment over defaults, ranges, --help."""

from __future__ import annotations

import pytest
from conftest import wait_for

from legal_eagle import MODEL_ID
from legal_eagle.config import OPTIONS, Settings, build_parser


def test_defaults_are_the_real_model_in_4bit() -> None:
    s = Settings.load([], {})
    assert s.model_path == MODEL_ID
    assert s.model_format == "awq" and s.backend == "auto" and s.port == 7860
    assert s.enable_prefix_caching is True and s.log_user_text is False


def test_flag_beats_environment_beats_default() -> None:
    env = {"LE_SESSION_LEN": "4096", "LE_PORT": "9000", "LE_QUANT_POLICY": "8"}
    s = Settings.load(["--port", "9100", "--model-format", "hf", "--no-enable-prefix-caching"], env)
    assert (s.port, s.session_len, s.quant_policy, s.model_format) == (9100, 4096, 8, "hf")
    assert s.enable_prefix_caching is False


def test_lmdeploy_spelled_flags_exist() -> None:
    flags = build_parser().format_help()
    for flag in ("--model-path", "--model-format", "--cache-max-entry-count", "--quant-policy", "--session-len",
                 "--tp", "--backend", "--max-batch-size", "--port", "--host"):
        assert flag in flags


def test_every_option_is_a_setting_and_documented() -> None:
    names = set(Settings.__dataclass_fields__)
    assert {o.name for o in OPTIONS} == names
    help_text = build_parser().format_help()
    for option in OPTIONS:
        assert f"LE_{option.name.upper()}" in help_text


def test_platform_port_and_host_variables() -> None:
    s = Settings.load([], {"GRADIO_SERVER_PORT": "7861", "GRADIO_SERVER_NAME": "0.0.0.0"})
    assert (s.port, s.host) == (7861, "0.0.0.0")
    assert Settings.load([], {"PORT": "8080"}).port == 8080
    assert Settings.load([], {"PORT": "8080", "LE_PORT": "8081"}).port == 8081


@pytest.mark.parametrize(("env", "message"), [
    ({"LE_CACHE_MAX_ENTRY_COUNT": "1.5"}, "cache_max_entry_count must be between 0.01 and 0.95"),
    ({"LE_SESSION_LEN": "lots"}, "LE_SESSION_LEN must be a int"),
    ({"LE_ENABLE_PREFIX_CACHING": "maybe"}, "must be true/false"),
    ({"LE_QUANT_POLICY": "3"}, "quant_policy must be one of [0, 4, 8]"),
    ({"LE_BACKEND": "cuda"}, "backend must be one of"),
    ({"LE_MAX_NEW_TOKENS": "5000"}, "max_new_tokens must be between 1 and 4096"),
])
def test_bad_values_raise_valueerror_with_range(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Settings.load([], env)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_bad_flag_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.load(["--quant-policy", "3"], {})
    assert "invalid choice" in capsys.readouterr().err


def test_readme_documents_every_setting_and_ci_runs_its_test_command() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    for option in OPTIONS:
        assert f"`--{option.name.replace('_', '-')}" in readme and f"`LE_{option.name.upper()}`" in readme
    command = "python3 -m pytest -q"
    assert command in readme and command in (root / ".ci" / "run").read_text()


def test_calibration_setting_builds_the_awq_spec(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert Settings().calibration_spec().source == "builtin"
    assert Settings.load(["--calibration", "none"]).calibration_spec().source == "none"
    text = tmp_path / "calib.txt"
    text.write_text("问：房东不退押金怎么办？\n答：可以起诉。\n", encoding="utf-8")
    spec = Settings.load([], {"LE_CALIBRATION": str(text)}).calibration_spec()
    assert spec.source == "file" and spec.path == text
    with pytest.raises(ValueError, match="calibration"):
        Settings(calibration=str(tmp_path / "missing.txt"))


def test_min_agreement_is_a_share() -> None:
    assert Settings.load(["--min-agreement", "0"]).min_agreement == 0.0
    with pytest.raises(ValueError, match="min_agreement"):
        Settings(min_agreement=1.5)


def test_loader_hands_calibration_and_threshold_to_prepare(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from legal_eagle import loader, prepare

    seen = {}

    def fake_prepare(source, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(prepare, "prepare_model", fake_prepare)
    settings = Settings(backend="transformers", cache_dir=str(tmp_path), calibration="none", min_agreement=0.0)
    with pytest.raises(RuntimeError, match="stop here"):
        loader.load_engine(settings, lambda *a: None)
    assert seen["calib"].source == "none" and seen["min_agreement"] == 0.0


def test_loader_says_a_too_old_driver_before_any_download(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from legal_eagle import loader, platform, prepare
    from legal_eagle.errors import PlatformError
    from legal_eagle.service import ModelService

    old = platform.check_platform(torch_version="2.12.1+cu130", torch_cuda="13.0", engine_cuda="12.8.90",
                                  driver_version="550.54.15", gpus=[platform.Gpu(0, "NVIDIA A10", 24 * 10**9,
                                                                                  23 * 10**9)])
    monkeypatch.setattr(platform, "collect_platform", lambda local_engine=True: old)
    monkeypatch.setattr(prepare, "prepare_model", lambda *a, **k: pytest.fail("must not download"))
    settings = Settings(backend="turbomind", cache_dir=str(tmp_path))
    with pytest.raises(PlatformError) as info:
        loader.load_engine(settings, lambda *a: None)
    assert "驱动 550.54.15 太旧" in info.value.user_message and "CUDA 13.0" in info.value.user_message
    service = ModelService(lambda progress: loader.load_engine(settings, progress))
    service.start()
    assert wait_for(lambda: service.status().stage == "failed", 10)
    assert "驱动 550.54.15 太旧" in service.status().describe()  # what the start page shows
    monkeypatch.setattr(platform, "collect_platform", lambda local_engine=True: pytest.fail("not for fake"))
    loader.load_engine(Settings(backend="fake"), lambda *a: None)  # the scripted engine needs no GPU


def test_app_log_survives_lmdeploy_muting_root_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from lmdeploy.utils import get_logger

    from legal_eagle.config import configure_logging

    try:
        configure_logging("INFO")
        get_logger("lmdeploy_test_logger_mutes_root")  # sets plain root StreamHandlers to ERROR
        logging.getLogger("legal_eagle.test").info("still heard after lmdeploy")
        assert "still heard after lmdeploy" in capsys.readouterr().err
    finally:
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
