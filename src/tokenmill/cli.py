"""The ``tokenmill`` command: run a recipe, run the bundled demo, validate a recipe, rebuild a report."""

from __future__ import annotations

import argparse
import contextlib
import os
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
    p.add_argument("--until", metavar="STAGE", help="stop after this stage: read, curate, tokenizer, pack, "
                                                    "train, export, eval or report (e.g. pack, then train on "
                                                    "several GPUs with `tokenmill train RUN --nproc N`)")


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

    p = sub.add_parser("train", help="run only the train stage of an existing run folder (torchrun-able)",
                       description="Train (or resume training) the model of RUN from its recipe.yaml and packed "
                                   "tokens. Run it under torchrun for FSDP2 over several GPUs: torchrun "
                                   "--nproc_per_node=N -m tokenmill train RUN, or pass --nproc N.")
    p.add_argument("run", type=Path, help="run folder (made by `tokenmill run`, packed at least); with --dry-run "
                                          "also a recipe file")
    p.add_argument("--nproc", type=_positive_int, help="start N processes on this node with torchrun")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="print the predicted memory per device (parameters, "
                   "gradients, optimizer state, activations) and allocate nothing")
    p.add_argument("--micro-batch", type=_positive_int, metavar="N",
                   help="with --dry-run: the micro-batch to predict for (default: the recipe's)")

    p = sub.add_parser("export", help="export a checkpoint of a run in Hugging Face format",
                       description="Write a checkpoint of RUN (default: the last) as a Hugging Face Llama folder "
                                   "that AutoModelForCausalLM loads; tokenmill_export.json in it records the step "
                                   "and the training stage's fingerprint.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--step", type=_positive_int, help="checkpoint step (default: the last one kept)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/model for the last checkpoint, "
                                            "RUN/exports/step-N for --step N)")

    p = sub.add_parser("validate", help="check a recipe and report every error at once",
                       description="Check a recipe: the schema, and what would fail only once running (sources "
                                   "that match no file, a warm-up as long as training, options whose optional "
                                   "package is not installed).")
    p.add_argument("recipe", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("steps", help="list the curation and selection steps, or one step's parameters")
    p.add_argument("name", nargs="?", help="a step: its parameters, types, defaults and descriptions")

    p = sub.add_parser("init", help="write a commented starter recipe for a data path",
                       description="Write a starter recipe for DATA_PATH (a file, folder or glob): its format "
                                   "and fields, common curation steps, a small model. Never overwrites a file.")
    p.add_argument("data", metavar="DATA_PATH", help="the documents: a file, a folder or a glob")
    p.add_argument("--out", type=Path, default=Path("recipe.yaml"), help="recipe to write (default: recipe.yaml)")

    p = sub.add_parser("inspect", help="show what curation kept and removed, with samples per reason")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--step", help="a step number (3 = curate/03-*, 0 = the read stage), folder name (e.g. "
                                  "03-gopher_quality) or step name (read: the read stage); without it, the "
                                  "funnel of every step")
    p.add_argument("--reason", help="only samples removed for this reason")
    p.add_argument("--samples", type=int, default=3, help="documents shown per group (default 3)")
    p.add_argument("--chars", type=int, default=300, help="characters shown per document (default 300)")

    p = sub.add_parser("report", help="rebuild report.html of a run folder")
    p.add_argument("run", type=Path, help="run folder")

    p = sub.add_parser("eval", help="evaluate a run's model: harness tasks, membership inference, bits per byte",
                       description="Evaluate RUN/model, write the results into RUN/eval/ and rebuild the report.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--harness", nargs="?", const="", metavar="TASK[,TASK]",
                   help="lm-evaluation-harness tasks (without a value: the bundled tokenmill_cloze and "
                        "tokenmill_realcont; also lm_eval's own tasks whose data are in the local Hugging Face "
                        "cache); adds them to eval/harness.json, replacing earlier results of the same tasks")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N items of each task")
    p.add_argument("--num-fewshot", "--num_fewshot", type=int, metavar="K",
                   help="few-shot examples per item, overriding the tasks' own")
    p.add_argument("--output-path", "--output_path", type=Path, metavar="DIR",
                   help="also write lm-evaluation-harness's own result files into DIR")
    p.add_argument("--log-samples", "--log_samples", action="store_true",
                   help="write every item's prompt, response and score into --output_path")
    p.add_argument("--task-dir", type=Path, metavar="DIR", help="folder of extra task YAML files with local data")
    p.add_argument("--backend", choices=["tokenmill", "hf"], default="tokenmill",
                   help="load the model into tokenmill's Llama (default) or lm_eval's transformers model")
    members = p.add_mutually_exclusive_group()
    members.add_argument("--membership", nargs=2, type=Path, metavar=("MEMBERS.jsonl", "NONMEMBERS.jsonl"),
                         help="texts seen in training and texts never seen; writes eval/membership.json")
    members.add_argument("--membership-auto", type=_positive_int, metavar="N",
                         help="membership inference on N curated training documents against N held-out ones")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--bpb", action="store_true", help="recompute eval/bpb.json (bits per byte per domain)")
    p.add_argument("--objective", action="store_true", help="encoders and encoder-decoders: recompute "
                   "eval/objective.json (masked-token accuracy, PLL bits per byte, RTD accuracy, span loss, probe)")

    p = sub.add_parser("compare", help="compare runs at equal tokens and at equal compute",
                       description="One table and plots of every evaluation of the runs against tokens seen "
                                   "and training FLOPs; writes OUT/compare.html and OUT/compare.json.")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders (two or more)")
    p.add_argument("--out", type=Path, required=True, help="folder for compare.html and compare.json")
    p.add_argument("--fit", action="store_true", help="fit a scaling law to the runs' final validation losses")
    p.add_argument("--bootstrap", type=_positive_int, default=200, metavar="N",
                   help="bootstrap resamples for the fit's intervals (default 200)")

    mix = sub.add_parser("mix", help="domain mixtures: search for the weights to train a recipe with",
                         description="Domain mixtures of a recipe's corpus.")
    mix_sub = mix.add_subparsers(dest="mix_command", required=True, metavar="COMMAND")
    p = mix_sub.add_parser("search", help="find domain weights with small proxy models (RegMix / CLIMB)",
                           description="Train small proxies of the recipe's model on sampled domain mixtures, fit a "
                                       "regressor from weights to held-out bits per byte and predict the best "
                                       "mixture (settings: the recipe's mix_search section). Writes OUT/search.json, "
                                       "OUT/proxies.csv and OUT/best_mixture.yaml; rerunning resumes.")
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("--out", type=Path, required=True, help="search folder, e.g. runs/mix-x")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set mix_search.proxies=32 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _evaluate(args: argparse.Namespace) -> None:
    from tokenmill.evaluate import model_evals as evals
    from tokenmill.report.run_report import write_report
    from tokenmill.runfolder import RunFolder

    if args.harness is None and not (args.membership or args.membership_auto or args.bpb or args.objective):
        raise TokenmillError("eval: nothing to evaluate; pass --harness, --membership, --membership-auto, --bpb "
                             "or --objective")
    evals.model_dir(args.run)
    with RunFolder(args.run).lock():
        if args.objective:
            from tokenmill.evaluate.objective_evals import eval_objective, objective_table

            print(objective_table(eval_objective(args.run, progress=False)))
        if args.bpb:
            print(evals.bpb_table(evals.eval_bpb(args.run, progress=False)))
        if args.harness is not None:
            tasks = [t for t in args.harness.split(",") if t] or None
            print(evals.harness_table(evals.eval_harness(
                args.run, tasks, task_dir=args.task_dir, backend=args.backend, limit=args.limit,
                num_fewshot=args.num_fewshot, log_samples=args.log_samples, output_path=args.output_path)))
        if args.membership or args.membership_auto:
            if args.membership:
                members, nonmembers = (evals.read_texts(f, args.text_field) for f in args.membership)
                source = {"members": str(args.membership[0]), "nonmembers": str(args.membership[1])}
            else:
                members, nonmembers, source = evals.auto_membership_texts(args.run, args.membership_auto)
            print(evals.membership_table(evals.eval_membership(args.run, members, nonmembers, source)))
        print(write_report(args.run))


def _compare(args: argparse.Namespace) -> None:
    from tokenmill.evaluate.compare import compare_runs, cost_table, summary_table
    from tokenmill.report.compare_report import write_compare

    result = compare_runs(args.runs, fit=args.fit, n_bootstrap=args.bootstrap)
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print("compute:")
    print(cost_table(result) + "\n")
    print(f"at equal tokens ({result['equal_tokens']['tokens']:,.0f}):")
    print(summary_table(result, "equal_tokens"))
    print(f"\nat equal compute ({result['equal_compute']['flops']:.3g} FLOPs):")
    print(summary_table(result, "equal_compute"))
    print("\nfinal (each run at its end: " + ", ".join(f"{r['name']} {r['tokens']:,.0f} tokens"
                                                      for r in result["runs"]) + "):")
    print(summary_table(result, "final"))
    if "fit" in result:
        fit = result["fit"]
        intervals = fit["intervals"]
        print(f"\n{fit['formula']} on {fit['target']}: " + ", ".join(
            f"{k} = {v:.4g}" + (f" [{intervals[k][0]:.4g}, {intervals[k][1]:.4g}]" if k in intervals else "")
            for k, v in fit["params"].items()))
    print(write_compare(result, args.out))


def _train(args: argparse.Namespace) -> int:
    """The train stage of ``args.run``; with ``--nproc``, this same command relaunched under torchrun."""
    if args.dry_run:
        print(_dry_run(args))
        return 0
    if args.nproc:
        import subprocess

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "tokenmill", "train", str(args.run), *(["--no-progress"] if args.no_progress else [])]
        return subprocess.run(cmd).returncode
    from tokenmill.recipe import load_recipe
    from tokenmill.run import Runner
    from tokenmill.runfolder import RunFolder

    folder = RunFolder(args.run).require()
    # Under torchrun every rank runs this; rank 0 holds the folder for all of them.
    with folder.lock() if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        Runner(load_recipe(folder.recipe), args.run, progress=not args.no_progress).train()
    return 0


def _dry_run(args: argparse.Namespace) -> str:
    """The predicted memory of a run folder's training (its tokenizer sets the vocabulary) or of a recipe
    file (its tokenizer.vocab_size, or the checkpoint it starts from)."""
    from tokenmill.console import text_table
    from tokenmill.recipe import load_recipe
    from tokenmill.run import Runner
    from tokenmill.runfolder import RunFolder
    from tokenmill.train.memory import predict

    if args.run.is_file():
        recipe = load_recipe(args.run)
        if recipe.model.init_from:
            from tokenmill.model.hf import hf_model_config

            model = hf_model_config(recipe.model.init_from)
        else:
            model = recipe.model.model_copy(update={"vocab_size": recipe.tokenizer.vocab_size})
    else:
        folder = RunFolder(args.run).require()
        if not (folder.tokenizer / "tokenizer.json").is_file():
            raise TokenmillError(f"{folder.root} has no tokenizer yet: run `tokenmill run ... --until tokenizer`, "
                                 f"or pass the recipe file")
        runner = Runner(load_recipe(folder.recipe), folder.root)
        recipe, model = runner.recipe, runner.model_config()
    world = args.nproc or 1
    memory = predict(model, recipe.train, args.micro_batch, world_size=world)
    micro_batch = args.micro_batch or recipe.train.micro_batch_size
    rows = [(name.removesuffix("_bytes").replace("_", " "), memory[name] / 2**20) for name in memory]
    return (f"predicted memory per device: optimizer {recipe.train.optimizer.name}, micro-batch {micro_batch} x "
            f"{recipe.train.seq_len} tokens, {world} device(s), activation checkpointing "
            f"{recipe.train.activation_checkpointing}\n" + text_table(["", "MiB"], rows)
            + "\n(activations are an estimate; a run's train/summary.json has the measured peak)")


def _export(args: argparse.Namespace) -> Path:
    from tokenmill.recipe import load_recipe
    from tokenmill.run import Runner
    from tokenmill.runfolder import RunFolder

    folder = RunFolder(args.run).require()
    out = args.out or (folder.root / "exports" / f"step-{args.step}" if args.step else folder.model)
    with folder.lock():
        return Runner(load_recipe(folder.recipe), folder.root, progress=False).export(args.step, out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)

        if args.command == "export":
            print(_export(args))
            return 0

        if args.command == "report":
            from tokenmill.report.run_report import write_report

            print(write_report(args.run))
            return 0

        if args.command == "eval":
            _evaluate(args)
            return 0

        if args.command == "compare":
            _compare(args)
            return 0

        if args.command == "mix":
            from tokenmill.mix_search import search_mixture
            from tokenmill.recipe import load_recipe

            search_mixture(load_recipe(args.recipe, args.overrides, preflight=True), args.out,
                           progress=not args.no_progress)
            return 0

        if args.command == "steps":
            from tokenmill.recipe_help import step_help, steps_overview

            print(step_help(args.name) if args.name else steps_overview())
            return 0

        if args.command == "init":
            from tokenmill.recipe_help import starter_recipe

            text = starter_recipe(args.data, args.out)
            try:
                with open(args.out, "x", encoding="utf-8") as fh:
                    fh.write(text)
            except FileExistsError:
                raise TokenmillError(f"{args.out} already exists; choose another --out or remove it") from None
            print(f"wrote {args.out}; check it with `tokenmill validate {args.out}`")
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
        recipe = load_recipe(path, args.overrides, preflight=True)
        if args.command == "validate":
            print(f"{path}: valid recipe {recipe.name!r}")
            print(dump_recipe(recipe), end="")
            return 0

        from tokenmill.run import run_recipe

        t0 = time.perf_counter()
        out = run_recipe(recipe, args.out, progress=not args.no_progress, overwrite=args.overwrite,
                         until=args.until)
        seconds = time.perf_counter() - t0
        if args.until and args.until != "report":
            print(f"[tokenmill] stopped after {args.until} in {seconds:.1f}s: {out} (no report yet; rerun "
                  f"without --until to finish)")
        else:
            print(f"[tokenmill] done in {seconds:.1f}s: {out}/report.html")
        return 0
    except TokenmillError as err:
        print(f"tokenmill: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        where = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
        print(f"tokenmill: error: {where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntokenmill: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
