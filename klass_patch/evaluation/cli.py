"""``klass-patch eval`` and ``klass-patch plot-steps``.

Wire into a ``klass-patch`` parser with ``add_subcommands(subparsers)`` and, after parsing,
``dispatch(args)`` (returns None for a command that is not one of these). ``main(argv)`` runs them alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .results import OutputBusy
from .settings import ALGS, DATASETS, FAMILIES

COMMANDS = ("eval", "plot-steps")
ALL_ALGS = tuple(dict.fromkeys(a for algs in ALGS.values() for a in algs))


def add_subcommands(subparsers) -> None:
    e = subparsers.add_parser(
        "eval", help="evaluate a model on GSM8K, MATH500, HumanEval or MBPP (or --compare finished runs)",
        description="Evaluate LLaDA or Dream with KLASS or upstream's samplers, with the authors' prompts, scoring "
                    "and per-dataset settings. Unset sampling options take the authors' published values.")
    g = e.add_argument_group("model and data")
    g.add_argument("--model", help="local folder or Hugging Face hub id (AutoModel, trust_remote_code=True)")
    g.add_argument("--family", choices=FAMILIES, help="model family (default: from the model's config)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="model dtype (auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--llada-generate", metavar="PATH",
                   help="LLaDA's generate.py (default: ./generate.py if present, else klass-patch's stand-in)")
    g.add_argument("--dataset", choices=DATASETS)
    g.add_argument("--data", metavar="PATH", help="local JSON / JSONL(.gz) file (default: the public dataset, "
                                                  "through the `datasets` library)")
    g.add_argument("--limit", type=int, metavar="N", help="first N examples only")
    g.add_argument("--batch-size", type=int, default=1,
                   help="examples per model call (default 1); where sampling is random (temperature > 0, alg "
                        "random / origin) examples run one at a time, each with its own seed, so that the text "
                        "does not depend on the batch size")
    g.add_argument("--out", metavar="DIR", help="output folder (default: eval_results/<model>/<dataset>/<method>)")
    g.add_argument("--allow-code-execution", action="store_true",
                   help="needed for humaneval and mbpp: run the generated code against the tests")
    g.add_argument("--timeout", type=float, help="seconds per test program (default 3)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = e.add_argument_group("sampling (default: the authors' settings for the family and dataset)")
    s.add_argument("--alg", choices=ALL_ALGS, help="klass (default); LLaDA: default, random; "
                                                   "Dream: maskgit_plus, origin, topk_margin, entropy")
    s.add_argument("--conf-threshold", type=float)
    s.add_argument("--kl-threshold", type=float)
    s.add_argument("--kl-history-length", type=int)
    s.add_argument("--unmask-strategy", choices=("all", "max_conf", "min_kl"))
    s.add_argument("--gen-length", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--block-length", type=int, help="LLaDA; Dream with --use-cache (default 32)")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float, help="Dream only")
    s.add_argument("--mask-id", type=int, help="LLaDA mask token id (default: the model's, else 126336)")
    s.add_argument("--seed", type=int)
    s.add_argument("--use-cache", choices=("prefix", "dual"), help="KV cache (klass_patch.cache); default: none")
    s.add_argument("--cache-refresh-every", type=int, help="with --use-cache: also a full forward every N forwards")
    s.add_argument("--save-steps", action="store_true", help="write each example's step log (steps/<id>.jsonl)")
    e.add_argument("--compare", nargs="+", metavar="DIR",
                   help="print the table of finished runs (their summary.json) instead of evaluating: one row per "
                        "folder, then the settings that differ; speed-ups (steps, and generation seconds per "
                        "example) are against the first, and shown only for runs that differ from it in the "
                        "sampler alone (alg, KLASS thresholds, cache)")

    p = subparsers.add_parser(
        "plot-steps", help="draw a step log (PNG)",
        description="LOG a step log file (steps/<id>.jsonl): which position was decided at which step, with what "
                    "confidence and KL. LOG an eval folder run with --save-steps: the final KL of correct vs "
                    "incorrect answers (the paper's Figure 1b).")
    p.add_argument("log", metavar="LOG")
    p.add_argument("--out", metavar="PNG", help="default: LOG with .png (file) or LOG/final_kl.png (folder)")
    p.add_argument("--row", type=int, default=0, help="row of a batched step log (default 0)")


def dispatch(args) -> "int | None":
    command = getattr(args, "command", None)
    if command not in COMMANDS:
        return None
    try:
        if command == "plot-steps":
            from .plotting import plot_steps

            print(f"wrote {plot_steps(args.log, args.out, args.row)}")
            return 0
        if args.compare:
            from .compare import compare

            print(compare(args.compare))
            return 0
        return run_from_args(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"klass-patch {command}: error: {e}", file=sys.stderr)
        return 2
    except OutputBusy as e:  # another run writes the output folder
        print(f"klass-patch {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nklass-patch {command}: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130


SAMPLING = ("alg", "conf_threshold", "kl_threshold", "kl_history_length", "unmask_strategy", "gen_length", "steps",
            "block_length", "temperature", "top_p", "mask_id", "seed", "timeout", "use_cache", "cache_refresh_every")


def run_from_args(args) -> int:
    """Everything that can be checked is checked before the model is loaded; then load, evaluate, report."""
    from .distributed import Dist, cpu_launch_note
    from .loading import detect_family, resolve_device_dtype
    from .results import output_lock
    from .runner import refuse_code_execution
    from .settings import resolve_settings

    for flag in ("model", "dataset"):
        if not getattr(args, flag):
            raise ValueError(f"--{flag} is required (unless --compare)")
    refuse_code_execution(args.dataset, args.allow_code_execution)
    given = {k: getattr(args, k) for k in SAMPLING}
    given.update(save_steps=args.save_steps or None, batch_size=args.batch_size if args.batch_size != 1 else None)
    if args.family is not None:  # settings first: a bad value is reported before anything is loaded
        resolve_settings(args.family, args.dataset, **given)
    examples = _examples(args)
    dist = Dist.from_env()  # accelerate launch / torchrun: RANK, WORLD_SIZE, LOCAL_RANK
    say = print if dist.is_main else (lambda *_: None)
    note = cpu_launch_note()
    if note:
        say(note)
    family = detect_family(args.model, args.family)
    settings = resolve_settings(family, args.dataset, **given)
    device, dtype = resolve_device_dtype(dist.device(args.device), args.dtype)
    out = Path(args.out) if args.out else default_out(args.model, settings)
    try:
        dist.setup(device)
        with output_lock(out, dist):  # a second run into `out` fails here, before anything is loaded
            summary = _evaluate(args, dist, say, examples, settings, given, out, device, dtype)
    finally:
        dist.close()
    say(f"accuracy {summary['accuracy']}% ({summary['correct']}/{summary['n']}), average steps "
        f"{summary['average_steps']}, {summary['tokens_per_second']} tokens/s, generation time "
        f"{summary['wall_time_s']} s -> {out / 'summary.json'}")
    return 0


def _examples(args):
    from .data import load_examples

    examples = load_examples(args.dataset, args.data, args.limit)
    if not examples:
        raise ValueError("no examples to evaluate (check --data and --limit)")
    return examples


def _evaluate(args, dist, say, examples, settings, given, out, device, dtype) -> dict:
    """Report what will run, check the folder, load (tokenizer first), run."""
    from .data import PUBLIC
    from .loading import load_llada_generate, load_model
    from .runner import check_resumable, make_run, run_eval
    from .settings import describe

    source = str(Path(args.data).resolve()) if args.data else PUBLIC[args.dataset][0]
    say(f"klass-patch eval: {args.model} ({settings.family}) on {args.dataset}, {len(examples)} examples from "
        f"{source}")
    say(f"settings (the authors' defaults for {settings.family}/{args.dataset} unless marked 'set'):")
    say(describe(settings, given))
    say(f"output: {out}" + (f" ({dist.world_size} processes)" if dist.world_size > 1 else ""))
    generate_fn = None
    if settings.family == "llada":
        generate_fn, generate_source = load_llada_generate(args.llada_generate, log=say)
        source += f" (llada generate: {generate_source})"
    check_resumable(out, make_run(settings, args.model, source), ignore=("mask_id",))  # before the loading
    model, tokenizer = load_model(args.model, device, dtype)
    return run_eval(model, tokenizer, examples, settings, out, generate_fn=generate_fn,
                    allow_code_execution=args.allow_code_execution, model_name=args.model, data_source=source,
                    progress=not args.no_progress, dist=dist)


def default_out(model: str, settings) -> Path:
    name = Path(model.rstrip("/")).name or "model"
    method = settings.alg
    if settings.alg == "klass":
        method += f"_conf{settings.conf_threshold}_kl{settings.kl_threshold}_n{settings.kl_history_length}"
        method += "" if settings.unmask_strategy == "all" else f"_{settings.unmask_strategy}"
    return Path("eval_results") / name / settings.dataset / f"{method}_len{settings.gen_length}_steps{settings.steps}"


def main(argv=None) -> int:
    """``python -m klass_patch.evaluation.cli eval ...``: these subcommands alone."""
    parser = argparse.ArgumentParser(prog="klass-patch")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
