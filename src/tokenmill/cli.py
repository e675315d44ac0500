"""The ``tokenmill`` command: run a recipe, run the bundled demo, validate a recipe, rebuild a report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tokenmill import TokenmillError, __version__

DEMO_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run folder first instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill",
        description="Data-efficient language-model pretraining: curate, select, pretrain and evaluate "
                    "from one YAML recipe.")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe into a run folder (resumes an interrupted run)",
                       description="Run every stage of a recipe. Rerunning the same command resumes: "
                                   "completed stages and shards are skipped, training restarts from its "
                                   "last checkpoint.")
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. runs/my-experiment")
    _add_run_args(p)

    p = sub.add_parser("demo", help="run the bundled demo recipe on the bundled corpus (CPU, minutes)",
                       description=f"Runs {DEMO_RECIPE.name} on three small public-domain/permissive "
                                   f"domains bundled with tokenmill.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    _add_run_args(p)

    p = sub.add_parser("validate", help="check a recipe and report every error at once")
    p.add_argument("recipe", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("inspect", help="show what curation kept and removed, with samples per reason")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--step", help="a step folder name (e.g. 03-gopher_quality) or step name; "
                                  "without it, the funnel of every step")
    p.add_argument("--reason", help="only samples removed for this reason")
    p.add_argument("--samples", type=int, default=3, help="documents shown per group (default 3)")
    p.add_argument("--chars", type=int, default=300, help="characters shown per document (default 300)")

    p = sub.add_parser("report", help="rebuild report.html of a run folder")
    p.add_argument("run", type=Path, help="run folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from tokenmill.report.html import write_report

            if not (args.run / "recipe.yaml").exists():
                raise TokenmillError(f"{args.run} is not a run folder (no recipe.yaml)")
            print(write_report(args.run))
            return 0

        if args.command == "inspect":
            from tokenmill.curate.inspect import funnel_table, inspect_step

            print(funnel_table(args.run))
            if args.step:
                print()
                print(inspect_step(args.run, args.step, args.samples, args.reason, args.chars))
            return 0

        from tokenmill.recipe import dump_recipe, load_recipe

        path = DEMO_RECIPE if args.command == "demo" else args.recipe
        recipe = load_recipe(path, args.overrides)
        if args.command == "validate":
            print(f"{path}: valid recipe {recipe.name!r}")
            print(dump_recipe(recipe), end="")
            return 0

        from tokenmill.run import run_recipe

        t0 = time.perf_counter()
        out = run_recipe(recipe, args.out, progress=not args.no_progress, overwrite=args.overwrite)
        print(f"[tokenmill] done in {time.perf_counter() - t0:.1f}s: {out}/report.html")
        return 0
    except TokenmillError as err:
        print(f"tokenmill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntokenmill: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
