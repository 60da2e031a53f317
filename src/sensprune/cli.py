"""Command-line interface: argument parsing only; each command is one call into the library.

Usage errors print one line and exit 2; no traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .checkpoint import write_text_atomic
from .errors import SensPruneError, TrainingDiverged


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def _setting_choices(name: str) -> tuple[str, ...] | None:
    from .config import CHOICES
    from .data import DATASETS
    from .methods import REGISTRY
    from .models import MODELS

    named = {"model": tuple(sorted(MODELS)), "dataset": tuple(sorted(DATASETS)),
             "method": tuple(REGISTRY)}
    return named.get(name, CHOICES.get(name))


def add_setting_options(parser: argparse.ArgumentParser, *names: str,
                        dest: str | None = None) -> None:
    """One option per setting of TrainConfig (all of them, or ``names``), generated from the
    field's declaration: type, choices, bound, help. Unset options parse to None, so they
    override nothing; ``--foo-bar`` sets ``foo_bar``; a bool defaulting to True is turned
    off by its declared flag (``--no-amp``)."""
    import dataclasses

    from .config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if names and f.name not in names or not meta.get("cli", True):
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        text = meta.get("help") or f.name.replace("_", " ")
        kinds = {k.strip() for k in str(f.type).split("|")}
        if kinds == {"bool"}:  # the flag turns a default on off, or a default off on
            text = (f"turn off: {text}" if f.default else text) + \
                f" (default: {'on' if f.default else 'off'})"
        elif f.default is not dataclasses.MISSING and f.default is not None:
            text += f" (default: {f.default})"
        kw: dict = {"dest": dest or f.name, "default": None, "help": text}
        if kinds == {"bool"}:
            kw["action"] = "store_false" if f.default else "store_true"
        elif (choices := _setting_choices(f.name)) is not None:
            kw["choices"] = choices
        elif "int" in kinds:
            kw["type"] = _positive_int if meta.get("min") == 1 else int
        elif "float" in kinds and kinds <= {"float", "None"}:
            kw["type"] = _nonneg_float if meta.get("min") == 0 else float
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kw)


def _add_deploy_commands(sub) -> None:
    """`export` and `bench-infer`."""
    from .export.container import COMPRESSIONS
    from .export.encodings import VALUE_FORMATS

    ex = sub.add_parser("export", help="write a compact sparse file (and optionally ONNX)")
    ex.add_argument("checkpoint", help="a run directory, its checkpoint.pt or model.pt, or an "
                    "earlier export (.safetensors)")
    ex.add_argument("-o", "--output", required=True, help="output file (.safetensors)")
    ex.add_argument("--values", choices=VALUE_FORMATS, default="fp32",
                    help="value format (default: fp32)")
    ex.add_argument("--compact", action="store_true", help="remove every neuron, channel and "
                    "input with no path to the output first: a smaller dense network with the "
                    "same predictions (chain networks; others are exported as they are)")
    ex.add_argument("--compress", choices=COMPRESSIONS, default="none",
                    help="pack the arrays into one LZMA stream (default: none)")
    ex.add_argument("--onnx", metavar="FILE", help="also export ONNX and check it against torch")
    ex.add_argument("--data-dir", help="directory with the dataset's files (default: the embedded MNIST, then "
                    "$SENSPRUNE_DATA, then ~/.cache/sensprune)")
    ex.add_argument("--json", metavar="FILE", help="write the size/accuracy report as JSON")

    bi = sub.add_parser("bench-infer", help="latency of dense vs sparse inference of an export")
    bi.add_argument("file", help="an export written by `sensprune export` (.safetensors)")
    bi.add_argument("--reps", type=_positive_int, default=200,
                    help="timed repetitions per batch size and kernel (default: 200)")
    bi.add_argument("--threads", type=_positive_int, default=1,
                    help="torch CPU threads for the timing (default: 1)")
    bi.add_argument("--json", metavar="FILE", help="write the measurements as JSON")


def build_parser() -> argparse.ArgumentParser:
    from .config import RECIPES_DIR

    p = _Parser(prog="sensprune", description="Train sparse networks with "
                "sensitivity-driven regularization (Tartaglione et al., NeurIPS 2018).")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("train", help="train (and sparsify) a model",
                       description="Train a model. Settings: defaults < --recipe < options.")
    recipes = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.toml")))
    t.add_argument("--recipe", help=f"TOML recipe file or a bundled name ({recipes})")
    add_setting_options(t)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--quick", action="store_true",
                   help="a quick try of the recipe: 3 epochs on 5,000 images, each phase one "
                   "epoch (seconds; says the pipeline works, not what the recipe reaches)")
    t.add_argument("--compare", metavar="TABLE",
                   help="after training, print this run beside the rows of a reproduce "
                   "table.json trained with the same settings (mean ± std over their seeds) "
                   "and its published points")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run that OUT holds (default: refuse)")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on the test set")
    e.add_argument("checkpoint", help="a run directory, its checkpoint.pt or its model.pt")
    e.add_argument("--data-dir", help="directory with the dataset's files (default: the embedded MNIST, then "
                    "$SENSPRUNE_DATA, then ~/.cache/sensprune)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    r = sub.add_parser("report", help="print a run's (or a reproduce directory's) table and "
                       "draw its plot")
    r.add_argument("run_dir", help="a run directory (summary.json) or a reproduce output "
                   "directory (table.json)")

    ins = sub.add_parser("inspect", help="how the sensitivity and its decay are distributed "
                         "per layer (table, histogram PNG)",
                         description="S and the decay factor max(decay_floor, 1 - beta*S/norm) per layer "
                         "of a trained run, on its first training images. Settings left out "
                         "take the run's own.")
    ins.add_argument("run", help="a run directory (model.pt + summary.json, or checkpoint.pt)")
    ins.add_argument("--images", type=_positive_int, default=100,
                     help="training images S is computed on (default: 100)")
    for name in INSPECT_SETTINGS:
        add_setting_options(ins, name)
    ins.add_argument("--png", help="histograms (default: RUN/sensitivity.png for a directory)")
    ins.add_argument("--json", metavar="FILE", help="write the statistics as JSON")
    ins.add_argument("--data-dir", help="directory with the dataset's files (default: the embedded MNIST, then "
                    "$SENSPRUNE_DATA, then ~/.cache/sensprune)")

    _add_deploy_commands(sub)

    rp = sub.add_parser("reproduce", help="run the paper's comparison: the method and baselines",
                        description="Train the sensitivity method and the baselines on the same "
                        "network, data and epoch budget; write table.md, table.json, pareto.png.")
    rp.add_argument("experiment", help="lenet300, lenet5, lenet5-fashion, or a recipe file")
    rp.add_argument("--methods", help="comma-separated method labels (default: all in the recipe)")
    rp.add_argument("--lam-sweep", help="comma-separated extra lambda values for the recipe's "
                    "'sensitivity' row (one more run each)")
    rp.add_argument("--assemble", action="store_true",
                    help="train nothing: write the table from the finished runs in --out "
                    "(rows without one are listed as not run)")
    rp.add_argument("--quick", action="store_true",
                    help="the whole pipeline on a small subset in about a minute")
    rp.add_argument("--out", help="output directory (default: runs/reproduce-EXPERIMENT)")
    rp.add_argument("--data-dir", help="directory with the dataset's files (default: the embedded MNIST, then "
                    "$SENSPRUNE_DATA, then ~/.cache/sensprune)")
    rp.add_argument("--seed", type=int, help="one seed for every row (default: the recipe's)")
    rp.add_argument("--seeds", help="comma-separated seeds: every row once per seed, and the "
                    "mean over seeds in table.md")
    rp.add_argument("--threads", type=_positive_int, help="torch CPU threads per run")
    return p


def cmd_train(args) -> int:
    from .config import TrainConfig, make_config
    from .report import summary_markdown
    from .train import train

    # every option whose name is a setting overrides it (unset options are None: no override)
    overrides = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
    if args.quick:  # options given on the command line still win
        from .config import quick_overrides
        overrides = {**quick_overrides(args.recipe),
                     **{k: v for k, v in overrides.items() if v is not None}}
    cfg = make_config(args.recipe, **overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    from .results import RunSummary

    if isinstance(summary, RunSummary):  # rank 0 (or the only process) reports
        print(summary_markdown(summary))
        print(f"wrote {cfg.out}/summary.json, summary.md, model.pt, checkpoint.pt, metrics.jsonl")
        if args.compare:
            from .report import compare_to_table
            print(compare_to_table(summary, args.compare))
    return 0


def cmd_evaluate(args) -> int:
    from .report import evaluation_text
    from .train import evaluate_run

    result = evaluate_run(args.checkpoint, args.data_dir)
    print(json.dumps(result, indent=2) if args.json else evaluation_text(result))
    return 0


def cmd_report(args) -> int:
    from .plots import plot_run
    from .report import read_run, summary_markdown

    table = Path(args.run_dir) / "table.json"
    if table.exists():  # a `sensprune reproduce` directory: the table, and the plot redrawn
        from .plots import plot_pareto
        from .report import comparison_markdown
        result = json.loads(table.read_text())
        print(comparison_markdown(result))
        png = plot_pareto(result, Path(args.run_dir) / "pareto.png")
        print(f"wrote {png}" if png else "(install matplotlib for pareto.png)")
        return 0

    summary, metrics = read_run(args.run_dir)
    print(summary_markdown(summary))
    if metrics:
        png = plot_run(metrics, Path(args.run_dir) / "curves.png")
        if png:
            from .rundir import record
            record(args.run_dir, "curves.png")  # the run's own file: --overwrite may replace it
        print(f"wrote {png}" if png else "(install matplotlib for curves.png)")
    return 0


# the settings `inspect` can override (the run's own otherwise); library and CLI names alike
from .methods.sensitivity import INSPECT as INSPECT_SETTINGS  # noqa: E402


def cmd_inspect(args) -> int:
    from .diagnose import inspect_run
    from .report import inspect_markdown

    from .rundir import check_outputs

    run = Path(args.run)
    check_outputs([run], {"--png": args.png, "--json": args.json})
    png = args.png or (run / "sensitivity.png" if run.is_dir() else None)
    result = inspect_run(run, images=args.images, png=png, data_dir=args.data_dir,
                         **{k: getattr(args, k) for k in INSPECT_SETTINGS})
    print(inspect_markdown(result))
    if result.get("png"):
        if not args.png and run.is_dir():
            from .rundir import record
            record(run, "sensitivity.png")
        print(f"wrote {result['png']}")
    if args.json:
        write_text_atomic(json.dumps({k: v for k, v in result.items() if k != "_values"},
                                     indent=2) + "\n", Path(args.json))
        print(f"wrote {args.json}")
    return 0


def _number_list(text: str | None, flag: str, cast=float) -> list | None:
    """Comma-separated numbers of type ``cast`` (float or int), or None for an empty option."""
    if not text:
        return None
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise SensPruneError(f"{flag} expects comma-separated {kind}, got {text!r}") from None


def cmd_export(args) -> int:
    from .export import export_checkpoint
    from .report import export_text
    from .rundir import check_outputs

    check_outputs([args.checkpoint], {"-o": args.output, "--onnx": args.onnx,
                                      "--json": args.json})

    result = export_checkpoint(args.checkpoint, args.output, values=args.values,
                               data_dir=args.data_dir, onnx_path=args.onnx,
                               compact=args.compact, compress=args.compress)
    print(export_text(result))
    if args.json:
        write_text_atomic(json.dumps(result, indent=2) + "\n", Path(args.json))
    return 0


def cmd_bench_infer(args) -> int:
    import torch

    from .export import bench_inference
    from .report import bench_infer_markdown

    from .rundir import check_outputs

    check_outputs([args.file], {"--json": args.json})
    torch.set_num_threads(args.threads)
    r = bench_inference(args.file, reps=args.reps)
    print(bench_infer_markdown(r))
    if args.json:
        write_text_atomic(json.dumps(r, indent=2) + "\n", Path(args.json))
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/reproduce-{Path(args.experiment).stem}"
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = reproduce(args.experiment, out, methods=methods, quick=args.quick,
                       lam_sweep=_number_list(args.lam_sweep, "--lam-sweep"),
                       data_dir=args.data_dir, seed=args.seed,
                       seeds=_number_list(args.seeds, "--seeds", int),
                       assemble=args.assemble)
    print((Path(out) / "table.md").read_text())
    print(f"wrote {out}/table.md, table.json, pareto.png ({result['wall_seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from ._version import __version__
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "report": cmd_report,
                    "reproduce": cmd_reproduce, "export": cmd_export,
                    "bench-infer": cmd_bench_infer, "inspect": cmd_inspect}
        return commands[args.command](args)
    except TrainingDiverged as exc:  # not a usage error: the run itself failed
        print(f"sensprune: error: {exc}", file=sys.stderr)
        return 1
    except SensPruneError as exc:
        print(f"sensprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        if args.command == "train" and out and (Path(out) / "checkpoint.pt").exists():
            print(f"sensprune: interrupted; the last finished epoch is in {out}/checkpoint.pt "
                  "(continue with --resume)", file=sys.stderr)
        elif args.command == "train" and out and Path(out).is_dir():
            print("sensprune: interrupted before any checkpoint was written; start again "
                  "with the same command and --overwrite (it replaces only what this run "
                  "wrote)", file=sys.stderr)
        else:
            print("sensprune: interrupted before any checkpoint was written; start again",
                  file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sensprune ... | head`: the reader left; nothing went wrong here
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the run directory removed mid-run, a disk that went away...
        print(f"sensprune: error: {exc.strerror or exc}"
              + (f": {exc.filename}" if exc.filename else "")
              + "; fix it and run again (a training run continues with --resume)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
