"""The `iar2` command line: one sub-command per pipeline step (the Snakemake rules call these).

Each command lives in the module that implements it; that module provides
`add_arguments(parser)` and `run(args) -> int | None`. Modules are imported only
when their command is chosen (or its --help asked for), so `iar2 --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import sys
import types
import typing
from pathlib import Path
from typing import Literal

from iar2.config import ConfigError, load_config

# (command words, module, one-line help). Keep in pipeline order: `iar2 --help` reads as the DAG.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("data", "builtin"), "iar2.data.builtin", "materialise the built-in offline dataset as an ImageFolder (train/val)"),
    (("data", "check"), "iar2.data.imagefolder", "scan an ImageFolder, count unreadable images, write a JSON report"),
    (("fetch-weights",), "iar2.weights", "download the pretrained Inception/VGG/LPIPS weights (needs internet)"),
    (("refnet", "train"), "iar2.refnet", "train the domain reference network (offline perceptual loss + metrics)"),
    (("vq", "train"), "iar2.tokenizer.train", "train a VQ tokenizer (single, semantic-detail or unassociated dual)"),
    (("vq", "eval"), "iar2.tokenizer.evaluate", "reconstruction metrics (rFID, PSNR, SSIM, LPIPS) on the val split"),
    (("vq", "import"), "iar2.tokenizer.convert", "convert a released LlamaGen / IAR / IAR2 VQ checkpoint"),
    (("tokenize",), "iar2.tokenize", "encode a dataset into memory-mapped codes (LlamaGen augmentations)"),
    (("rearrange",), "iar2.rearrange", "IAR codebook rearrangement by balanced k-means"),
    (("ar", "train"), "iar2.ar.train", "train an AR model (LlamaGen, IAR, IAR2 or a Table 5 paradigm)"),
    (("ar", "time-match"), "iar2.ar.time_match", "equal-time budget: steps per epoch matching a reference run's time"),
    (("ar", "import"), "iar2.ar.convert", "convert a released LlamaGen / IAR / IAR2 GPT checkpoint"),
    (("sample",), "iar2.sample", "class-conditional samples (sharded, resumable) as ADM .npz (+ PNGs)"),
    (("metrics",), "iar2.generation_metrics", "FID / IS / precision / recall of a sample set vs a reference set"),
    (("code-distance",), "iar2.code_distance", "Figure 3: decode codes replaced at growing code distance"),
    (("diagnose", "tokenizer"), "iar2.diagnose", "codebook usage/perplexity, full vs semantic-only rFID, flat decodes"),
    (("diagnose", "ar"), "iar2.diagnose", "per-level CE/accuracy vs entropy, cond/uncond KL, T=1 vs guided samples"),
    (("diagnose", "budget"), "iar2.diagnose", "optimiser steps, wall time and loss trends of AR runs and tokenizers"),
    (("diagnose", "joint-tokens"), "iar2.diagnose", "dual tokens as one joint vocabulary (LlamaGen on IAR2's tokens)"),
    (("report",), "iar2.report", "report: every paper table/figure beside ours, claims checklist, provenance (HTML+MD)"),
    (("track", "sync"), "iar2.tracking", "log the runs the jobs spooled (tracking.mode: spool) to the MLflow store"),
    (("bench", "tokenizer"), "iar2.bench", "benchmark tokenizer training steps/s"),
    (("bench", "tokenize"), "iar2.bench", "benchmark tokenization images/s"),
    (("bench", "kmeans"), "iar2.bench", "benchmark balanced k-means on a codebook"),
    (("bench", "train"), "iar2.bench", "benchmark AR training tokens/s per prediction paradigm"),
    (("bench", "sample"), "iar2.bench", "benchmark sampling images/s per paradigm, with/without KV cache, CFG mode"),
]


# ----------------------------------------------------------------------------- argparse types with a range
# Numeric options use these instead of int/float, so `--steps -3` stops at parsing with a message naming the
# option and the range, not deep in a run (or, worse, a run that silently does nothing).

def _number(kind, lo=None, hi=None, lo_open=False, what=""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or \
                (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what.replace(" ", "_")  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, what="a positive integer (>= 1)")
nonneg_int = _number(int, 0, what="a non-negative integer (>= 0)")
positive_float = _number(float, 0.0, lo_open=True, what="a positive number (> 0)")
nonneg_float = _number(float, 0.0, what="a non-negative number (>= 0)")
unit_float = _number(float, 0.0, 1.0, lo_open=True, what="a fraction in (0, 1]")


def int_range(lo: int, hi: int):
    """An integer in [lo, hi]."""
    return _number(int, lo, hi, what=f"an integer in [{lo}, {hi}]")


def float_min(lo: float):
    """A number >= lo."""
    return _number(float, lo, what=f"a number >= {lo:g}")


def _ranged(kind: type, md: dict, where: str):
    """The ranged argparse type of a numeric config field, from its metadata bounds (min / max / gt); the named
    types above where they fit, so their messages are the ones users already see."""
    lo, hi, gt = md.get("min"), md.get("max"), md.get("gt")
    if kind is int and gt is not None:
        lo, gt = gt + 1, None
    if lo is None and gt is None:
        raise TypeError(f"{where}: a numeric option needs a range (field metadata min, max or gt)")
    if kind is int:
        if hi is None:
            return {1: positive_int, 0: nonneg_int}.get(lo) or _number(int, lo, what=f"an integer >= {lo}")
        return int_range(lo, hi)
    if gt is not None:
        if gt == 0 and hi in (None, 1):
            return positive_float if hi is None else unit_float
        return _number(float, gt, hi, lo_open=True, what=f"a number > {gt:g}" + (f" and <= {hi:g}" if hi else ""))
    if hi is None:
        return nonneg_float if lo == 0 else float_min(lo)
    return _number(float, lo, hi, what=f"a number in [{lo:g}, {hi:g}]")


# ----------------------------------------------------------------------------- settings from a file and flags
# `iar2 refnet train`, `tokenize`, `vq eval` and `metrics` read their settings from a dataclass (iar2.config): a
# --config file (YAML or JSON) gives any of them, a flag of the same name overrides the file, and both are checked
# by the same field rules (a bad file value is named by its key, a bad flag by argparse). Paths stay flags.

def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """`--config FILE` and one option per field of `cls` (`batch_size` -> `--batch-size`), typed, ranged and
    described by the field. The options default to None: `load_run_config` then knows which flags were given."""
    p.add_argument("--config", metavar="FILE",
                   help=f"YAML or JSON mapping of {cls.__name__} settings: the options below by field name "
                        "(--batch-size: batch_size); a flag given too overrides the file")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, md, kw = hints[f.name], f.metadata, {}
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: the flag gives an X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) in (tuple, list):
            tp, kw["nargs"] = typing.get_args(tp)[0], "+"
        if typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif "choices" in md:
            kw["choices"] = list(md["choices"])
        elif tp in (int, float):
            kw["type"] = _ranged(tp, md, f"{cls.__name__}.{f.name}")
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        help_ = md.get("help", "") + ("" if default is None else f" (default: {shown})")
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=help_.strip() or None, **kw)


def load_run_config(cls: type, args: argparse.Namespace):
    """`cls` from the --config file, with every flag that was given taking precedence (iar2.config.load_config)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return load_config(cls, getattr(args, "config", None), data=given)


def _group_help(words: tuple[str, ...]) -> str:
    return {"data": "dataset preparation and checks", "refnet": "the domain reference network",
            "vq": "VQ tokenizers", "track": "MLflow run tracking", "ar": "autoregressive models",
            "diagnose": "measurements that tell a defect from a lack of scale (issue 16)",
            "bench": "benchmarks to run on your own hardware"}.get(words[0], "")



def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the module of the command named in argv is imported."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="iar2", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module, help_ in COMMANDS:
        if len(words) == 1:
            p = sub.add_parser(words[0], help=help_, description=help_)
        else:
            if words[0] not in groups:
                g = sub.add_parser(words[0], help=_group_help(words), description=_group_help(words))
                groups[words[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            p = groups[words[0]].add_parser(words[1], help=help_, description=help_)
        p.set_defaults(_module=module, _words=words)
        # Import the implementing module only if this command is the one asked for.
        if _selected(argv, words):
            mod = importlib.import_module(module)
            if hasattr(mod, "add_arguments_for"):
                mod.add_arguments_for(words, p)
            else:
                mod.add_arguments(p)
    return parser


def _selected(argv: list[str], words: tuple[str, ...]) -> bool:
    positional = [a for a in argv if not a.startswith("-")]
    return tuple(positional[: len(words)]) == words


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0
    mod = importlib.import_module(args._module)
    runner = getattr(mod, "run_for", None)
    # late imports: keep `iar2 --help` light
    from iar2.checkpoint import CheckpointError
    from iar2.data.imagefolder import DatasetError
    from iar2.io import UnwritableError, check_writable
    from iar2.tracking import TrackingError
    from iar2.training import NonFiniteError

    # Errors a user can act on end in one line naming the file or key, not a traceback (-v shows it).
    try:
        out = getattr(args, "out", None)
        if out and args._words[0] not in ("report",):  # a folder (run dir) or a file: its folder must take files
            check_writable(Path(out) if not Path(out).suffix else Path(out).parent)
        rc = runner(args._words, args) if runner else mod.run(args)
    except ConfigError as e:
        return _fail(args, f"invalid configuration: {e}", 2)
    except FileNotFoundError as e:
        return _fail(args, str(e), 3)
    except (CheckpointError, DatasetError, UnwritableError, TrackingError, NonFiniteError) as e:
        return _fail(args, str(e), 4)
    return int(rc or 0)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.verbose:
        logging.exception("details")
    print(f"iar2 {' '.join(args._words)}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
