"""Generate docs/config.md and docs/cli.md from the code, so that they cannot drift from it.

docs/config.md comes from the package's JSON Schema (``xslim_ort.config.config_schema()``),
docs/cli.md from the click commands (``xslim_ort.cli.cli``, walked recursively). Both are
pure functions of those sources; tests/test_docs.py regenerates them in memory and fails
when a committed file differs.

    python scripts/gen_docs.py            # rewrite docs/config.md and docs/cli.md
    python scripts/gen_docs.py --check    # exit 1 when either is out of date
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SECTIONS = ("model_parameters", "calibration_parameters", "quantization_parameters")
INPUT_ENTRY = "calibration_parameters.input_parametres[]"
CUSTOM_ENTRY = "quantization_parameters.custom_setting[]"

# Examples for keys whose schema gives none and whose default says little. Every example is
# wrapped into a config and validated by tests/test_docs.py.
FALLBACK_EXAMPLES: dict[str, Any] = {
    "model_parameters.skip_onnxsim": True,
    "calibration_parameters.calibration_step": 200,
    "calibration_parameters.calibration_device": "cpu",
    "calibration_parameters.calibration_type": "percentile",
    "calibration_parameters.calibration_batch_size": 8,
    "calibration_parameters.input_parametres": [
        {"input_name": "input", "input_shape": [1, 3, 224, 224], "data_list_path": "calib.txt"}
    ],
    "calibration_parameters.input_parameters": [
        {"input_name": "input", "input_shape": [1, 3, 224, 224], "data_list_path": "calib.txt"}
    ],
    "quantization_parameters.analysis_enable": False,
    "quantization_parameters.analysis_samples": 64,
    "quantization_parameters.precision_level": 2,
    "quantization_parameters.finetune_level": 2,
    "quantization_parameters.custom_setting": [
        {"input_names": ["/stem/Relu_output_0"], "output_names": ["/layer1/Conv_output_0"], "precision_level": 2}
    ],
    "quantization_parameters.ignore_op_names": ["/head/Gemm"],
    "quantization_parameters.target": "ort-cpu",
    "quantization_parameters.bias_mode": "int32",
    f"{INPUT_ENTRY}.input_name": "input",
    f"{INPUT_ENTRY}.dtype": "float32",
    f"{INPUT_ENTRY}.file_type": "npy",
    f"{INPUT_ENTRY}.color_format": "rgb",
    f"{CUSTOM_ENTRY}.input_names": ["/stem/Relu_output_0"],
    f"{CUSTOM_ENTRY}.output_names": ["/layer1/Conv_output_0"],
    f"{CUSTOM_ENTRY}.precision_level": 2,
    f"{CUSTOM_ENTRY}.calibration_type": "percentile",
    f"{CUSTOM_ENTRY}.max_percentile": 0.999,
}

# The complete example at the top of docs/config.md (validated by tests/test_docs.py).
FULL_EXAMPLE: dict[str, Any] = {
    "model_parameters": {
        "onnx_model": "models/resnet18.onnx",
        "output_prefix": "resnet18.q",
        "working_dir": "out/",
        "skip_onnxsim": False,
    },
    "calibration_parameters": {
        "calibration_step": 100,
        "calibration_device": "cpu",
        "calibration_type": "default",
        "input_parametres": [
            {
                "input_name": "data",
                "input_shape": [1, 3, 224, 224],
                "dtype": "float32",
                "file_type": "img",
                "color_format": "bgr",
                "mean_value": [103.94, 116.78, 123.68],
                "std_value": [57, 57, 57],
                "preprocess_file": "IMAGENET",
                "data_list_path": "calib/img_list.txt",
            }
        ],
    },
    "quantization_parameters": {
        "analysis_enable": True,
        "precision_level": 0,
        "finetune_level": 1,
        "max_percentile": 0.9999,
        "custom_setting": [
            {
                "input_names": ["/layer3/Relu_output_0"],
                "output_names": ["/layer4/Relu_output_0"],
                "calibration_type": "percentile",
                "max_percentile": 0.999,
            }
        ],
        "truncate_var_names": [],
    },
}

CONFIG_INTRO = """\
An xslim-ort config is one JSON object with up to three sections. For static int8
quantization only `calibration_parameters.input_parametres[*].data_list_path` is
required (and `model_parameters.onnx_model`, unless the model is given with `-i` or as an
argument of `quantize_onnx_model`); everything else has a default.

- Keys are checked strictly: an unknown key, a wrong type or a value outside the allowed
  ones is an error that names the key's path and, for a misspelt key, the closest known
  one. `xslim-ort quantize -v` prints the config with every default filled in.
- Relative input paths (`onnx_model`, `data_list_path`, `preprocess_file`) are looked up
  in the current directory, then in the config file's folder; a relative `working_dir`
  is made in the current directory.
- `xslim-ort schema` prints the JSON Schema this page is generated from (the package
  ships it as `xslim_ort/schema/config.schema.json`); point your editor at it to get
  completion and validation while you write a config.

See [accuracy-tuning.md](accuracy-tuning.md) for which keys to change when the quantized
model is not accurate enough, and [migrating.md](migrating.md) for how these keys map to
xslim's."""

CLI_INTRO = """\
`xslim-ort` is installed with the package; `python -m xslim_ort` is the same program.
xslim's own flags work without a command name: `python -m xslim_ort -c cfg.json -i in.onnx`
means `xslim-ort quantize -c cfg.json -i in.onnx`.

Exit codes: 0 success; 1 a failure while quantizing (or, for `check` and `zoo run`, a
model that does not pass); 2 bad usage, config, model or data; 130 interrupted (Ctrl-C);
143 terminated (SIGTERM). Errors are printed as one line on stderr; `-v` adds the
traceback. The global options `-v` and `-q` may stand anywhere on the command line:
`xslim-ort quantize cfg.json -v` is `xslim-ort -v quantize cfg.json`."""


def dump_json(value: Any, indent: int = 0) -> str:
    """JSON with objects one key a line and arrays of plain values on one line, as people write configs."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {dump_json(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [f"{inner}{dump_json(v, indent + 2)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def md_text(text: str) -> str:
    """Prose for Markdown: angle brackets shown, not taken for HTML tags."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def md_cell(text: str) -> str:
    return md_text(text).replace("|", "\\|")


def _generated_note(source: str) -> str:
    return f"<!-- Generated by scripts/gen_docs.py from {source}. Do not edit; run `python scripts/gen_docs.py`. -->"


# --------------------------------------------------------------------------- config.md


def _schema() -> dict[str, Any]:
    from xslim_ort.config import config_schema

    return config_schema()


def _resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


_TYPE_NAMES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "object": "object"}
_PLURAL = {"string": "strings", "integer": "integers", "number": "numbers", "boolean": "booleans", "object": "objects"}
_REF_NAMES = {"input_list": "input entries", "input": "input entries", "custom_setting": "custom_setting entries"}


def _type_text(node: dict[str, Any], schema: dict[str, Any]) -> str:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name == "input_list":
            return "array of input entries"
        node = _resolve(node, schema)
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    parts = []
    for t in types:
        if t == "null":
            continue
        if t == "array":
            items = node.get("items", {})
            if "$ref" in items:
                parts.append(f"array of {_REF_NAMES[items['$ref'].rsplit('/', 1)[-1]]}")
            else:
                item_type = items.get("type", "value")
                parts.append(f"array of {_PLURAL.get(item_type, item_type)}")
        else:
            parts.append(_TYPE_NAMES.get(t, t))
    text = " or ".join(parts)
    return f"{text} or null" if "null" in types else text


def _allowed_text(node: dict[str, Any], required: bool) -> str:
    rules = []
    if "enum" in node:
        rules.append(", ".join(f"`{json.dumps(v)}`" for v in node["enum"]))
    if "minimum" in node:
        rules.append(f"≥ {node['minimum']}")
    if "exclusiveMinimum" in node:
        rules.append(f"> {node['exclusiveMinimum']}")
    items = node.get("items", {})
    if "minimum" in items:
        rules.append(f"each item ≥ {items['minimum']}")
    if "exclusiveMinimum" in items:
        rules.append(f"each item > {items['exclusiveMinimum']}")
    if "minItems" in node:
        rules.append(f"at least {node['minItems']} item{'s' if node['minItems'] > 1 else ''}")
    if required:
        rules.append("required in every entry")
    if not rules and node.get("type") == "boolean":
        rules.append("`true`, `false`")
    return "; ".join(rules) if rules else "any"


def _default_text(node: dict[str, Any], required: bool) -> str:
    if required:
        return "none (required)"
    if "default" not in node:
        return "not set"
    return f"`{json.dumps(node['default'])}`"


def _example_value(path: str, node: dict[str, Any]) -> Any:
    if node.get("examples"):
        return node["examples"][0]
    if path in FALLBACK_EXAMPLES:
        return FALLBACK_EXAMPLES[path]
    default = node.get("default")
    if "enum" in node:
        return next(v for v in node["enum"] if v is not None and v != default)
    if default not in (None, [], {}):
        return default
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "integer" in types or "number" in types:
        return node.get("minimum", 1)
    if "boolean" in types:
        return True
    if "array" in types:
        return ["name"]
    return "value"


def wrap_example(path: str, value: Any) -> dict[str, Any]:
    """A minimal config that sets the key at ``path`` (``a.b``, ``a.b[].c``) to ``value``."""
    if path.startswith(INPUT_ENTRY + "."):
        key = path.removeprefix(INPUT_ENTRY + ".")
        return {"calibration_parameters": {"input_parametres": [{key: value}]}}
    if path.startswith(CUSTOM_ENTRY + "."):
        key = path.removeprefix(CUSTOM_ENTRY + ".")
        entry = {
            "input_names": FALLBACK_EXAMPLES[f"{CUSTOM_ENTRY}.input_names"],
            "output_names": FALLBACK_EXAMPLES[f"{CUSTOM_ENTRY}.output_names"],
        }
        entry[key] = value
        return {"quantization_parameters": {"custom_setting": [entry]}}
    section, key = path.split(".", 1)
    return {section: {key: value}}


def config_keys() -> list[tuple[str, dict[str, Any], bool]]:
    """Every documented key: (dotted path, its schema node with $ref resolved, required)."""
    schema = _schema()
    entries = {
        "calibration_parameters": (INPUT_ENTRY, "input"),
        "quantization_parameters": (CUSTOM_ENTRY, "custom_setting"),
    }
    keys = []
    for section in SECTIONS:
        for key, node in schema["properties"][section]["properties"].items():
            keys.append((f"{section}.{key}", node, False))
        if section in entries:
            prefix, name = entries[section]
            entry = schema["$defs"][name]
            for key, node in entry["properties"].items():
                keys.append((f"{prefix}.{key}", node, key in entry.get("required", [])))
    return keys


def _anchor(path: str) -> str:
    """GitHub's heading anchor for a heading that is just the path in backticks."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _key_block(path: str, node: dict[str, Any], required: bool, schema: dict[str, Any]) -> list[str]:
    resolved = _resolve(node, schema)
    description = node.get("description") or resolved.get("description", "")
    example = wrap_example(path, _example_value(path, resolved))
    return [
        f"### `{path}`",
        "",
        md_text(description),
        "",
        "| type | default | allowed |",
        "| --- | --- | --- |",
        f"| {_type_text(node, schema)} | {_default_text(resolved, required)} | {_allowed_text(resolved, required)} |",
        "",
        "```json",
        json.dumps(example, ensure_ascii=False),
        "```",
        "",
    ]


def render_config() -> str:
    """docs/config.md, from the JSON Schema."""
    schema = _schema()
    keys = config_keys()
    out = [
        "# Config reference",
        "",
        _generated_note("xslim_ort/schema/config.schema.json"),
        "",
        schema["description"],
        "",
        CONFIG_INTRO,
        "",
        "## A complete example",
        "",
        "```json",
        dump_json(FULL_EXAMPLE),
        "```",
        "",
        "## All keys",
        "",
        "| key | type | default |",
        "| --- | --- | --- |",
    ]
    for path, node, required in keys:
        resolved = _resolve(node, schema)
        out.append(
            f"| [`{path}`](#{_anchor(path)}) | {_type_text(node, schema)} | {_default_text(resolved, required)} |"
        )
    out.append("")
    headings = {
        "model_parameters": ("model_parameters", schema["properties"]["model_parameters"]["description"]),
        "calibration_parameters": (
            "calibration_parameters",
            schema["properties"]["calibration_parameters"]["description"],
        ),
        INPUT_ENTRY: (
            "calibration_parameters.input_parametres[]: one entry per model input",
            "Each entry says how to read the data of one model input. Entries are matched to the model's "
            "inputs by `input_name`, else by position. `input_parameters` (xslim 2.1.2's spelling) takes the "
            "same entries. For several inputs, line i of every list file belongs to sample i, so the lists "
            "must have the same order and length. A list file has one sample path per line, relative to the "
            "list file's folder; blank lines are skipped.",
        ),
        "quantization_parameters": (
            "quantization_parameters",
            schema["properties"]["quantization_parameters"]["description"],
        ),
        CUSTOM_ENTRY: (
            "quantization_parameters.custom_setting[]: one override region",
            "A region is every op on a path from one of `input_names` to one of `output_names` (constant "
            "inputs such as weights need not be listed). Every input must reach an output and every output "
            "must be computed from an input, else the config is rejected; the region never spills past its "
            "outputs. The analysis report prints ready-to-paste entries for the worst layers.",
        ),
    }
    current = None
    for path, node, required in keys:
        group = path.rsplit(".", 1)[0]
        if group != current:
            title, text = headings[group]
            out += [f"## {title}", "", md_text(text), ""]
            current = group
        out += _key_block(path, node, required, schema)
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- cli.md


def _param_names(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"`{param.human_readable_name}`"
    # short options first; click builds the help option's names from a set, in no fixed order
    opts = sorted([*param.opts, *param.secondary_opts], key=lambda o: o.startswith("--"))
    return ", ".join(f"`{o}`" for o in opts)


def _param_type(param: click.Parameter, ctx: click.Context) -> str:
    info = param.to_info_dict()
    if isinstance(param, click.Option) and param.count:
        return "count (repeat: `-vv`)"
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    ptype = param.type
    if isinstance(ptype, click.IntRange | click.FloatRange):
        kind = "integer" if isinstance(ptype, click.IntRange) else "number"
        bounds = []
        if ptype.min is not None:
            bounds.append(f"{'>' if ptype.min_open else '≥'} {ptype.min}")
        if ptype.max is not None:
            bounds.append(f"{'<' if ptype.max_open else '≤'} {ptype.max}")
        text = f"{kind} {', '.join(bounds)}".strip()
    elif isinstance(ptype, click.Choice):
        text = " \\| ".join(f"`{c}`" for c in ptype.choices)
    elif isinstance(ptype, click.Path):
        text = "file" if not info["type"]["dir_okay"] else "folder" if not info["type"]["file_okay"] else "path"
        if info["type"]["exists"]:
            text += " (must exist)"
    elif ptype is click.INT:
        text = "integer"
    elif ptype is click.FLOAT:
        text = "number"
    else:
        text = "text"
    if isinstance(param, click.Option) and param.metavar:
        text += f" `{param.metavar}`"
    if param.multiple:
        text += ", repeatable"
    return text


def _param_default(param: click.Parameter) -> str:
    info = param.to_info_dict()
    if param.required:
        return "required"
    default = info.get("default")
    if isinstance(param, click.Option) and (param.is_flag or param.count):
        return ""
    if default is None or default == () or default == []:
        return ""
    return f"`{default}`"


def _help_markdown(text: str) -> list[str]:
    """A click docstring as Markdown: ``\\b`` paragraphs become code blocks."""
    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        if para.startswith("\b"):
            out += ["```", para.removeprefix("\b").strip("\n"), "```", ""]
        else:
            out += [md_text(" ".join(line.strip() for line in para.splitlines())), ""]
    return out


def _command_contexts(group: click.Command, name: str) -> list[click.Context]:
    """The contexts of ``group`` and every subcommand, depth first, in name order."""
    root = group.make_context(name, [], resilient_parsing=True)
    found = []

    def walk(ctx: click.Context) -> None:
        found.append(ctx)
        cmd = ctx.command
        if isinstance(cmd, click.Group):
            for sub_name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, sub_name)
                if sub is None or sub.hidden:
                    continue
                walk(sub.make_context(sub_name, [], parent=ctx, resilient_parsing=True))

    walk(root)
    return found


def _command_block(ctx: click.Context) -> list[str]:
    cmd = ctx.command
    out = [f"## `{ctx.command_path}`", ""]
    if cmd.help:
        out += _help_markdown(cmd.help)
    out += ["```", cmd.get_usage(ctx).removeprefix("Usage: ").strip(), "```", ""]
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
    if params:
        out += ["| argument or option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for p in params:
            if isinstance(p, click.Argument):
                help_text, default = "positional argument", "required" if p.required else "optional"
            else:
                help_text, default = p.help or "", _param_default(p)
            out.append(f"| {_param_names(p)} | {_param_type(p, ctx)} | {default} | {md_cell(help_text)} |")
        out.append("")
    if isinstance(cmd, click.Group):
        out += ["| command | what it does |", "| --- | --- |"]
        for sub_name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, sub_name)
            if sub is None or sub.hidden:
                continue
            path = f"{ctx.command_path} {sub_name}"
            out.append(f"| [`{sub_name}`](#{_anchor(path)}) | {md_cell(sub.get_short_help_str(limit=200))} |")
        out.append("")
    return out


def render_cli(group: click.Command | None = None, name: str = "xslim-ort") -> str:
    """docs/cli.md, from the click command tree."""
    if group is None:
        from xslim_ort.cli import cli as group
    contexts = _command_contexts(group, name)
    out = ["# Command-line reference", "", _generated_note("the click commands of xslim_ort.cli"), "", CLI_INTRO, ""]
    out += ["Commands:", ""]
    for ctx in contexts[1:]:
        out.append(f"- [`{ctx.command_path}`](#{_anchor(ctx.command_path)})")
    out.append("")
    for ctx in contexts:
        out += _command_block(ctx)
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- main


def generated() -> dict[Path, str]:
    return {DOCS / "config.md": render_config(), DOCS / "cli.md": render_cli()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        current = path.read_text("utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(text, "utf-8")
            print(f"wrote {path.relative_to(REPO)}")
    for path in stale:
        print(f"out of date: {path.relative_to(REPO)} (run python scripts/gen_docs.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
