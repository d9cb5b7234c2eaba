"""The hosting files are valid: ms_deploy.json, packages.txt, requirements.txt, docs/hosting.md commands."""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from legal_eagle.config import OPTIONS, Settings

ROOT = Path(__file__).resolve().parent.parent
# ModelScope's documented quick-deploy resources (studios/quick-create docs); the live schema has the full enums.
MODELSCOPE_RESOURCES = {"platform/2v-cpu-16g-mem", "xgpu/8v-cpu-32g-mem-16g", "xgpu/8v-cpu-64g-mem-48g"}
SECRET_WORDS = ("AUTH", "KEY", "TOKEN", "PASSWORD", "SECRET")


def known_env_vars() -> set[str]:
    """Every environment variable ``Settings.load`` reads."""
    return {name for option in OPTIONS for name in (f"LE_{option.name.upper()}", *option.env_extra)}


def pins() -> dict[str, str]:
    """requirements.txt as {name: version}; fails on any line that is not ``name==version``."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[\w,-]+\])?==([\w.+!-]+)", line)
        assert match, f"requirements.txt: {line!r} is not pinned with =="
        out[match.group(1).lower()] = match.group(3)
    return out


@pytest.fixture(scope="module")
def deploy() -> dict[str, Any]:
    return json.loads((ROOT / "ms_deploy.json").read_text(encoding="utf-8"))


def test_ms_deploy_has_the_gradio_fields(deploy: dict[str, Any]) -> None:
    assert deploy["sdk_type"] == "gradio" and (ROOT / "app.py").is_file()  # gradio studios run app.py
    assert deploy["sdk_version"] == pins()["gradio"]
    assert re.fullmatch(r"ubuntu\d\d\.\d\d-py3\d+-torch[\d.]+-modelscope[\d.]+", deploy["base_image"])
    assert "-py311-" in deploy["base_image"]  # the Python the project is tested with
    assert deploy["resource_configuration"] in MODELSCOPE_RESOURCES
    assert deploy["resource_configuration"].startswith("xgpu/")  # 4-bit 7B needs a GPU with >= 8 GB
    assert "port" not in deploy  # only for sdk_type docker; a gradio app gets its port from LE_PORT


def test_ms_deploy_environment_is_valid_settings(deploy: dict[str, Any]) -> None:
    env_list = deploy["environment_variables"]
    assert all(set(item) == {"name", "value"} and isinstance(item["value"], str) for item in env_list)
    env = {item["name"]: item["value"] for item in env_list}
    assert len(env) == len(env_list), "a variable is listed twice"
    unknown = set(env) - known_env_vars()
    assert not unknown, f"not read by config.Settings: {unknown}"
    assert not [n for n in env if any(word in n for word in SECRET_WORDS)], "secrets belong in the Studio settings"
    settings = Settings.load([], env)
    assert (settings.host, settings.port) == ("0.0.0.0", 7860)
    assert settings.backend == "auto" and settings.model_format == "awq"


def test_packages_txt_lists_only_debian_package_names() -> None:
    lines = (ROOT / "packages.txt").read_text().splitlines()
    names = [line.strip() for line in lines if line.strip()]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name) for name in names), names  # no comments, no flags
    assert len(names) == len(set(names))


def test_requirements_are_pinned_to_a_cuda12_torch() -> None:
    pinned = pins()
    assert {"lmdeploy", "torch", "gradio", "modelscope"} <= set(pinned)
    major, minor = (int(p) for p in pinned["torch"].split(".")[:2])
    assert (major, minor) < (2, 11), "PyPI torch >= 2.11 is a CUDA 13 build: it needs NVIDIA driver >= 580"


@functools.cache
def lmdeploy_parser() -> Any:
    """LMDeploy 0.18's own command-line parser (built once; nothing is run)."""
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.serve import SubCliServe

    CLI.add_parsers()
    SubCliServe.add_parsers()
    return CLI.parser


def shell_blocks(markdown: str) -> list[str]:
    """The fenced ```bash blocks of a markdown text."""
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


def lmdeploy_commands(block: str) -> list[list[str]]:
    """The ``lmdeploy ...`` command lines of a block as argv lists (leading VAR=value words dropped)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)
        if words and words[0] == "lmdeploy":
            out.append(words[1:])
    return out


def test_hosting_doc_lmdeploy_commands_parse_with_lmdeploy() -> None:
    text = (ROOT / "docs" / "hosting.md").read_text(encoding="utf-8")
    commands = [cmd for block in shell_blocks(text) for cmd in lmdeploy_commands(block)]
    assert len(commands) >= 4
    parser = lmdeploy_parser()
    for argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"lmdeploy refuses: lmdeploy {' '.join(argv)}")
        if argv[:2] == ["serve", "api_server"]:
            assert args.backend == "turbomind" and args.model_format == "awq"
    tp = [parser.parse_args(a).tp for a in commands if a[:2] == ["serve", "api_server"]]
    assert 2 in tp
    assert any(a[:2] == ["serve", "proxy"] for a in commands)
    assert any(parser.parse_args(a).proxy_url for a in commands if a[:2] == ["serve", "api_server"])


def test_every_multi_gpu_block_turns_nvlink_multicast_off() -> None:
    text = (ROOT / "docs" / "hosting.md").read_text(encoding="utf-8")
    multi = [b for b in shell_blocks(text) if re.search(r"--tp [2-9]|CUDA_VISIBLE_DEVICES=\d,\d|--proxy-url", b)]
    assert len(multi) >= 3
    for block in multi:
        assert "TM_COMM_NVLS_ENABLE=0" in block and "NCCL_NVLS_ENABLE=0" in block, block


def test_hosting_doc_app_commands_parse_with_our_parser() -> None:
    """``python app.py ...`` lines use real flags (the remote ones once config.py has the remote backend)."""
    from legal_eagle.config import BACKENDS, build_parser

    text = (ROOT / "docs" / "hosting.md").read_text(encoding="utf-8")
    checked = 0
    for block in shell_blocks(text):
        for line in block.splitlines():
            words = shlex.split(line)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words.pop(0)
            if words[:2] != ["python", "app.py"]:
                continue
            if "remote" not in BACKENDS and "remote" in words:
                continue  # proposed flags, not in config.py yet
            try:
                build_parser().parse_args(words[2:])
            except SystemExit:
                pytest.fail(f"app.py refuses: {line}")
            checked += 1
    assert checked >= 1
