"""The documentation: generated references are current, every example config is valid, links resolve."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import click
import pytest

from xslim_ort._version import __version__
from xslim_ort.cli import cli
from xslim_ort.config import config_schema, load_config
from xslim_ort.targets import load_target, parse_target

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MARKDOWN = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *DOCS.glob("*.md")])
SECTIONS = {"model_parameters", "calibration_parameters", "quantization_parameters"}


def _load_gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _load_gen_docs()


def _json_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every ```json fenced block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        stripped = line.strip()
        if current is None and stripped == "```json":
            current, start = [], number
        elif current is not None and stripped == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"{path}:{start}: unclosed ```json block"
    return blocks


def _all_json_blocks() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(REPO)}:{n}", text) for p in MARKDOWN for n, text in _json_blocks(p)]


# --------------------------------------------------------------------------- generated references


def test_config_reference_is_current():
    committed = (DOCS / "config.md").read_text("utf-8")
    assert committed == gen_docs.render_config(), "docs/config.md is stale: run python scripts/gen_docs.py"


def test_cli_reference_is_current():
    committed = (DOCS / "cli.md").read_text("utf-8")
    assert committed == gen_docs.render_cli(), "docs/cli.md is stale: run python scripts/gen_docs.py"


def test_check_mode_reports_no_stale_file(capsys):
    assert gen_docs.main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_check_mode_names_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen_docs, "DOCS", tmp_path)
    monkeypatch.setattr(gen_docs, "REPO", tmp_path)
    (tmp_path / "config.md").write_text("old\n", "utf-8")
    assert gen_docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "out of date: config.md (run python scripts/gen_docs.py)",
        "out of date: cli.md (run python scripts/gen_docs.py)",
    ]
    assert (tmp_path / "config.md").read_text("utf-8") == "old\n"


def test_every_schema_key_is_documented():
    schema = config_schema()
    expected = {f"{section}.{key}" for section in SECTIONS for key in schema["properties"][section]["properties"]}
    expected |= {f"{gen_docs.INPUT_ENTRY}.{k}" for k in schema["$defs"]["input"]["properties"]}
    expected |= {f"{gen_docs.CUSTOM_ENTRY}.{k}" for k in schema["$defs"]["custom_setting"]["properties"]}
    assert set(schema["properties"]) == SECTIONS
    documented = [path for path, _, _ in gen_docs.config_keys()]
    assert sorted(documented) == sorted(expected)
    text = (DOCS / "config.md").read_text("utf-8")
    for path in expected:
        assert f"### `{path}`\n" in text


def test_config_reference_shows_type_default_and_allowed_values():
    text = (DOCS / "config.md").read_text("utf-8")
    block = text.split("### `calibration_parameters.calibration_type`\n", 1)[1].split("\n### ", 1)[0]
    assert block == (
        "\nActivation range method. Start with default, then try percentile or minmax.\n\n"
        "| type | default | allowed |\n| --- | --- | --- |\n"
        '| string | `"default"` | `"default"`, `"kl"`, `"minmax"`, `"percentile"`, `"mse"` |\n\n'
        "```json\n"
        '{"calibration_parameters": {"calibration_type": "percentile"}}\n'
        "```\n"
    )
    block = text.split("### `quantization_parameters.custom_setting[].input_names`\n", 1)[1].split("\n### ", 1)[0]
    assert "| array of strings | none (required) | at least 1 item; required in every entry |" in block


@pytest.mark.parametrize("path", [p for p, _, _ in gen_docs.config_keys()])
def test_each_key_example_is_a_valid_config(path):
    node = dict(next(n for p, n, _ in gen_docs.config_keys() if p == path))
    node = gen_docs._resolve(node, config_schema())
    load_config(gen_docs.wrap_example(path, gen_docs._example_value(path, node)))


def test_cli_reference_covers_every_command_and_option():
    text = (DOCS / "cli.md").read_text("utf-8")
    contexts = gen_docs._command_contexts(cli, "xslim-ort")
    paths = [ctx.command_path for ctx in contexts]
    assert {"xslim-ort", "xslim-ort quantize", "xslim-ort check", "xslim-ort analyze", "xslim-ort schema"} <= set(paths)
    for ctx in contexts:
        section = text.split(f"## `{ctx.command_path}`\n", 1)[1].split("\n## ", 1)[0]
        for param in ctx.command.get_params(ctx):
            names = [param.human_readable_name] if isinstance(param, click.Argument) else param.opts
            for name in names:
                assert f"`{name}`" in section, (ctx.command_path, name)


def test_cli_generator_walks_any_group():
    @click.group()
    def tool():
        """A tool."""

    @tool.group()
    def outer():
        """Outer <group>."""

    @outer.command()
    @click.argument("src")
    @click.option("--level", type=click.IntRange(0, 3), default=1, show_default=True, help="How | much.")
    @click.option("--mode", type=click.Choice(["a", "b"]), help="Pick one.")
    def inner(src, level, mode):
        """Do it.

        \b
        tool outer inner x
        """

    text = gen_docs.render_cli(tool, "tool")
    assert "- [`tool outer inner`](#tool-outer-inner)\n" in text
    assert "## `tool outer`\n\nOuter &lt;group&gt;.\n" in text
    assert (
        "## `tool outer inner`\n\nDo it.\n\n```\ntool outer inner x\n```\n\n```\ntool outer inner [OPTIONS] SRC\n```\n"
        in text
    )
    assert "| `SRC` | text | required | positional argument |\n" in text
    assert "| `--level` | integer ≥ 0, ≤ 3 | `1` | How \\| much. |\n" in text
    assert "| `--mode` | `a` \\| `b` |  | Pick one. |\n" in text


# --------------------------------------------------------------------------- examples in every doc


def test_every_json_block_parses():
    blocks = _all_json_blocks()
    assert len(blocks) > 40
    for where, text in blocks:
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{where}: invalid JSON: {exc}")


def test_every_example_config_is_valid():
    """Configs, custom_setting entries and target descriptors in the docs all load."""
    checked = {"config": 0, "custom_setting": 0, "descriptor": 0}
    for where, text in _all_json_blocks():
        data = json.loads(text)
        if isinstance(data, dict) and set(data) & SECTIONS:
            config = load_config(data)
            checked["config"] += 1
            checked["custom_setting"] += len(config.quantization_parameters.custom_setting)
        elif isinstance(data, dict) and {"input_names", "output_names"} <= set(data):
            load_config({"quantization_parameters": {"custom_setting": [data]}})
            checked["custom_setting"] += 1
        elif isinstance(data, dict) and {"ops", "weights"} <= set(data):
            parse_target(data, where)
            checked["descriptor"] += 1
    assert checked["config"] >= 40
    assert checked["custom_setting"] >= 3
    assert checked["descriptor"] >= 1


def test_tuning_configs_point_at_the_zoo_by_relative_path():
    for where, text in _all_json_blocks():
        if not where.startswith("docs/accuracy-tuning.md"):
            continue
        data = json.loads(text)
        model = data.get("model_parameters", {}).get("onnx_model") if isinstance(data, dict) else None
        if model:
            assert model.startswith("../shared/zoo/models/"), where


def test_builtin_descriptors_are_documented_field_by_field():
    text = (DOCS / "targets.md").read_text("utf-8")
    for name in ("spacemit", "ort_cpu"):
        data = json.loads((REPO / "targets" / name / "descriptor.json").read_text("utf-8"))
        for key, value in data.items():
            assert f"`{key}`" in text, (name, key)
            if isinstance(value, dict) and key in ("activation",):
                for sub in value:
                    assert f"`{key}.{sub}`" in text, (name, key, sub)
        for rule in data["weights"].values():
            for sub in rule:
                assert f"`{sub}`" in text, (name, sub)
        for handler in set(data["ops"].values()):
            assert f"`{handler}`" in text, (name, handler)
    load_target("spacemit")


# --------------------------------------------------------------------------- links, README, changelog


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    for path in MARKDOWN:
        for target in _LINK.findall(path.read_text("utf-8")):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            file_part = target.split("#", 1)[0]
            assert (path.parent / file_part).exists(), f"{path.relative_to(REPO)}: broken link {target}"


def test_readme_keeps_the_two_commands_and_links_every_doc():
    text = (REPO / "README.md").read_text("utf-8")
    assert "pip install . && xslim-ort quantize examples/mobilenet_v2/config.json\n" in text
    assert 'pip install -e ".[test]" && python -m pytest -q\n' in text
    for doc in ("config.md", "cli.md", "accuracy-tuning.md", "targets.md", "migrating.md", "benchmarks.md"):
        assert f"(docs/{doc})" in text
    assert "(CHANGELOG.md)" in text


def test_changelog_names_the_package_version():
    text = (REPO / "CHANGELOG.md").read_text("utf-8")
    assert text.startswith("# Changelog\n")
    assert "keepachangelog.com" in text
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert headings and headings[0] in ("Unreleased", __version__)
    if headings[0] == "Unreleased":
        assert f"To be released as {__version__}" in text
    for kind in re.findall(r"^### (.+)$", text, flags=re.M):
        assert kind in ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")
