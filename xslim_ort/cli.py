"""The ``xslim-ort`` command line (also ``python -m xslim_ort``).

Exit codes: 0 success, 1 a failure while quantizing, 2 bad usage, config, model or data,
130 interrupted (SIGINT), 143 terminated (SIGTERM). Errors are one line on stderr; ``-v``
adds the traceback. Both signals unwind the stack, so temporary files and caches are removed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence

import click

from ._version import __version__
from .errors import EXIT_FAILURE, EXIT_USAGE, XSlimError

log = logging.getLogger("xslim_ort")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _State:
    verbosity = 0


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity > 0 else "%(message)s"))
    root = logging.getLogger("xslim_ort")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@contextlib.contextmanager
def _progress_bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A click progress bar on stderr, or nothing with -q or when stderr is not a terminal."""
    if _State.verbosity < 0 or not sys.stderr.isatty():
        log.info("%s ...", label)
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


def _split_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="xslim-ort")
@click.option("-v", "--verbose", count=True, help="More output: -v shows the resolved config and tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Post-training int8 quantization of ONNX models for SpacemiT chips (XSlim-compatible).

    Run `xslim-ort COMMAND --help` for each command's options.
    """
    _State.verbosity = -1 if quiet else verbose
    _setup_logging(_State.verbosity)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("-c", "--config", "config_opt", type=click.Path(dir_okay=False), help="XSlim JSON config.")
@click.option(
    "-i", "--input", "model", type=click.Path(dir_okay=False), help="Float ONNX model (overrides onnx_model)."
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model path.")
@click.option("--dynq", is_flag=True, help="Dynamic quantization (precision_level 3).")
@click.option("--fp16", is_flag=True, help="FP16 conversion (precision_level 4).")
@click.option("--ignore_op_types", "--ignore-op-types", callback=_split_list, help="Op types kept float: A,B.")
@click.option("--ignore_op_names", "--ignore-op-names", callback=_split_list, help="Node names kept float: a,b.")
@click.option("--opset", type=click.IntRange(min=7), help="Target opset of the output model.")
@click.option("--target", help="Target descriptor: spacemit, ort-cpu or a descriptor .json.")
@click.option("--no-analysis", is_flag=True, help="Skip the analysis report (analysis_enable false).")
def quantize(
    config_file: str | None,
    config_opt: str | None,
    model: str | None,
    output: str | None,
    dynq: bool,
    fp16: bool,
    ignore_op_types: list[str] | None,
    ignore_op_names: list[str] | None,
    opset: int | None,
    target: str | None,
    no_analysis: bool,
) -> None:
    """Quantize a model as CONFIG_FILE (or -c) says, or per the flags without a config.

    \b
    xslim-ort quantize cfg.json
    xslim-ort quantize -c cfg.json -i in.onnx -o out.onnx
    xslim-ort quantize -i in.onnx -o out.onnx --dynq    # dynamic, no config
    xslim-ort quantize -i in.onnx -o out.onnx --fp16    # FP16, no config
    xslim-ort quantize -i in.onnx -o out.onnx           # simplify only
    """
    from .config import load_config
    from .pipeline import Mode, plan_job, run

    if config_file and config_opt:
        raise click.UsageError("give the config once: as an argument or with -c, not both")
    if dynq and fp16:
        raise click.UsageError("--dynq and --fp16 exclude each other")
    path = config_file or config_opt
    if path is None and model is None:
        raise click.UsageError("give a config file, or a model with -i")
    cfg = load_config(path) if path else None
    if cfg is not None:
        qp = cfg.quantization_parameters
        if ignore_op_types is not None:
            qp.ignore_op_types = ignore_op_types
        if ignore_op_names is not None:
            qp.ignore_op_names = ignore_op_names
        if target:
            qp.target = target
        if no_analysis:
            qp.analysis_enable = False
        if opset is not None:
            cfg.model_parameters.opset = opset
        if dynq:
            qp.precision_level = 3
        if fp16:
            qp.precision_level = 4
    elif any(v is not None for v in (ignore_op_types, ignore_op_names, target)) or opset is not None:
        qp_dict: dict = {}
        for key, val in (("ignore_op_types", ignore_op_types), ("ignore_op_names", ignore_op_names)):
            if val is not None:
                qp_dict[key] = val
        if target:
            qp_dict["target"] = target
        cfg = load_config({"quantization_parameters": qp_dict, "model_parameters": {"opset": opset}})
    mode = Mode.DYNAMIC if dynq else Mode.FP16 if fp16 else None
    if cfg is None or (path is None and mode is None):
        mode = mode or Mode.SIMPLIFY
    job = plan_job(cfg, model, output, mode=mode, progress=_progress_bar)
    if _State.verbosity > 0:
        click.echo(job.config.to_json(), err=True)
    run(job)
    click.echo(str(job.output_path))


@cli.command(context_settings=CONTEXT_SETTINGS)
def schema() -> None:
    """Print the JSON Schema of the config (for editors and validators)."""
    import json

    from .config import config_schema

    click.echo(json.dumps(config_schema(), indent=2))


def _register_optional_commands() -> None:
    """Commands that live beside their feature's package."""
    for module, attr in (
        ("xslim_ort.check", "check_command"),
        ("xslim_ort.analysis.command", "analyze_command"),
        ("xslim_ort.zoo.command", "zoo_group"),
    ):
        try:
            mod = __import__(module, fromlist=[attr])
        except ImportError:
            continue
        cli.add_command(getattr(mod, attr))


_register_optional_commands()

_COMMANDS_HELP = ("-h", "--help", "--version")


def _with_default_command(argv: Sequence[str]) -> list[str]:
    """Normalise the command line: -v/-q may stand anywhere, and xslim's flags without a
    command (``-c cfg.json -i m.onnx``) mean ``quantize``."""
    global_flags = {"-v", "-vv", "-vvv", "--verbose", "-q", "--quiet"}
    flags = [a for a in argv if a in global_flags]
    args = [a for a in argv if a not in global_flags]
    if args and args[0] not in cli.commands and args[0] not in _COMMANDS_HELP:
        args.insert(0, "quantize")
    return flags + args


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds (and cleans up) like Ctrl-C."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the CLI runs, SIGTERM raises ``_Terminated`` instead of killing the process outright."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(exc: BaseException | None) -> int:
    if isinstance(exc, _Terminated):
        click.echo("terminated", err=True)
        return 143
    click.echo("interrupted", err=True)
    return 130


def _one_line(message: str) -> str:
    """Messages quoting other libraries or user code can span lines; the error stays one line."""
    return " / ".join(part.strip() for part in message.splitlines() if part.strip())


@contextlib.contextmanager
def _restored_logger() -> Iterator[None]:
    """The CLI configures the ``xslim_ort`` logger for its run only (main() may be called in-process)."""
    logger = logging.getLogger("xslim_ort")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI and turn failures into one line and an exit code."""
    with _restored_logger():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = _with_default_command(sys.argv[1:] if argv is None else argv)
    try:
        with _sigterm_unwinds():
            rv = cli.main(args=args, prog_name="xslim-ort", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.exceptions.Abort as exc:  # click turns KeyboardInterrupt into Abort
        return _interrupted(exc.__cause__)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except XSlimError as exc:
        if _State.verbosity > 0:
            traceback.print_exc()
        click.echo(f"error: {_one_line(exc.message)}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug or an unexpected library failure: still one line
        if _State.verbosity > 0:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: {type(exc).__name__}: {first} (run with -v for the traceback)", err=True)
        return EXIT_FAILURE
    return rv if isinstance(rv, int) else 0
