"""Command line (``klass-patch``, also ``python -m klass_patch``): ``COMMANDS`` lists the commands; eval and
plot-steps come from ``klass_patch.evaluation.cli``, lm-eval from ``klass_patch.lm_eval``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# install/status/revert need only the standard library: torch, wrapt and the evaluation modules are imported
# by the commands that use them (a quick `klass-patch status`, and one that works where torch is missing).
FILE_COMMANDS = ("install", "status", "revert")
COMMANDS = {  # `klass-patch --help`: one line each
    "demo": "KLASS vs upstream's default sampler on a toy model",
    "install": "rewrite Dream/LLaDA files to accept alg=\"klass\"",
    "status": "say which version each file is, and if it is patched",
    "revert": "restore the original files byte for byte",
    "eval": "evaluate on GSM8K, MATH500, HumanEval or MBPP",
    "plot-steps": "which position was decided when (PNG)",
    "lm-eval": "lm-evaluation-harness's command line, `klass` model registered",
}
DESCRIPTION = ("KLASS (KL-Adaptive Stability Sampling) for LLaDA and Dream: their own code\n"
               "takes alg=\"klass\", rewritten on disk (install) or patched at run time.")
EPILOG = ("Without --dream/--llada, install/status/revert look in the Hugging Face caches\n"
          "and the current folder. `klass-patch COMMAND --help` shows a command's options.")

FILES_EPILOG = ("Without --dream/--llada: Dream's files in the Hugging Face hub cache and modules cache (a "
                "modules-cache copy of a local folder is listed, never changed: name the folder with --dream), "
                "and LLaDA's generate.py in the current folder.")


def _paper():
    """The authors' GSM8K KLASS settings per family (``cli.PAPER``)."""
    from .evaluation.settings import HISTORY_LENGTH, KLASS_DEFAULTS
    return {family: dict(conf_threshold=conf, kl_threshold=kl, kl_history_length=HISTORY_LENGTH)
            for (family, dataset), (conf, kl) in KLASS_DEFAULTS.items() if dataset == "gsm8k"}


def __getattr__(name):  # PEP 562: PAPER imports the evaluation settings (and torch) only when asked for
    if name == "PAPER":
        return _paper()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _row(name, out, expected, seconds):
    import torch
    per_step = [r["decoded_tokens_num"] for r in out.history]
    ok = "yes" if torch.equal(out.sequences[0, -len(expected):], expected) else "no"
    return (f"  {name:<32} forwards {int(out.used_steps[0]):>3}   correct {ok:<3}  {seconds * 1e3:6.1f} ms   "
            f"tokens unmasked per step: {' '.join(map(str, per_step))}")


def _timed(call):
    """``call()``'s result and wall time, after an untimed warm-up call: a first call pays one-off costs (lazy
    imports, first allocations, kernel selection) that are no part of the sampler's time."""
    call()
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def demo(gen_length=32, steps=32, block_length=8) -> int:
    """KLASS against upstream's default sampler on the toy denoiser (stand-ins of both families)."""
    import torch

    import klass_patch
    from klass_patch.toy import dream_generation, llada_generate
    from klass_patch.toy.models import ToyDenoiser, dream_model

    paper = _paper()
    klass_patch.apply(llada_generate)
    klass_patch.apply(dream_generation)
    prompt = torch.tensor([[3, 4, 5, 6]])
    expected = torch.arange(7, 7 + gen_length) % 50
    print("klass-patch demo: a toy denoiser that continues a counting sequence "
          f"(prompt 3 4 5 6, {gen_length} tokens to generate, {steps} steps).")
    print("Stand-ins with upstream's interfaces; the same calls work on LLaDA's generate.py and Dream's "
          "generation_utils.py after klass_patch.apply().")
    print("ms: the wall time of one call, timed after an untimed warm-up call of the same sampler.\n")

    print(f"LLaDA generate(..., block_length={block_length}):")
    model = ToyDenoiser()
    common = dict(steps=steps, gen_length=gen_length, block_length=block_length, mask_id=63,
                  return_dict_in_generate=True, save_steps=True)
    for name, extra in (("upstream low_confidence", {}), ("KLASS " + _fmt(paper["llada"]), dict(alg="klass", **paper["llada"]))):
        out, seconds = _timed(lambda: llada_generate.generate(model, prompt, **common, **extra))
        print(_row(name, out, expected, seconds))

    print("\nDream diffusion_generate(...):")
    special = dict(mask_token_id=63, pad_token_id=62, eos_token_id=62, bos_token_id=62)
    model = dream_model(dream_generation.DreamGenerationMixin, dream_generation.DreamGenerationConfig(**special))
    common = dict(max_new_tokens=gen_length, steps=steps, return_dict_in_generate=True, save_steps=True)
    for name, extra in (("upstream maskgit_plus", dict(alg="maskgit_plus")),
                        ("KLASS " + _fmt(paper["dream"]), dict(alg="klass", **paper["dream"]))):
        out, seconds = _timed(lambda: model.diffusion_generate(prompt, **common, **extra))
        print(_row(name, out, expected, seconds))
    print("\nKLASS unmasks every token that is confident and stable, so it needs fewer forwards.")
    return 0


def _fmt(p):
    return f"(conf {p['conf_threshold']}, KL {p['kl_threshold']}, n {p['kl_history_length']})"


def files(command, dream, llada, dry_run=False) -> int:
    """install / status / revert over the named targets, or the discovered ones."""
    from . import installer
    try:
        targets = [installer.resolve("dream", p) for p in dream] + [installer.resolve("llada", p) for p in llada]
    except installer.InstallError as e:
        print(f"klass-patch {command}: {e}", file=sys.stderr)
        return 2
    discovered = not targets
    if discovered:
        targets = installer.discover()
        print(f"klass-patch {command}: no --dream/--llada given; looked in {installer.hub_cache()}, "
              f"{installer.modules_cache()} and {Path.cwd()}: found {len(targets)} file(s)")
    failed = skipped = 0
    for target in targets:
        try:
            if command == "status":
                print(installer.state(target).describe())
                local = installer.local_copy_of(target.path)
                if local is not None:
                    print(f"  {installer.copy_advice(target, local, 'status')}")
            elif command == "install":
                print(installer.install(target, dry_run=dry_run).describe())
            else:
                print(installer.revert(target).describe())
        except installer.LocalCopyError as e:
            if command == "install" and discovered:  # listed, left alone; the install goes on
                print(e)
                continue
            print(f"klass-patch {command}: {e}", file=sys.stderr)  # named, or a patched folder left unreverted
            failed += 1
        except installer.UnknownVersionError as e:
            if not discovered:  # named on the command line: installing it failed
                print(f"klass-patch {command}: {e}", file=sys.stderr)
                failed += 1
                continue
            # found by discovery (a fine-tune's copy, an edited file): left alone, and the install goes on
            print(f"{e.path} [{target.origin}]: skipped (sha256 {e.sha256}): {e.reason}")
            skipped += 1
        except installer.InstallError as e:
            print(f"klass-patch {command}: {e}", file=sys.stderr)
            failed += 1
    if skipped:
        print(f"klass-patch {command}: skipped {skipped} file(s) of unknown versions, left as they are")
    return 1 if failed else 0


def lm_eval_command(argv) -> int:
    """``klass-patch lm-eval ARGS``: lm-eval's own command line, the ``klass`` model registered (lm-eval,
    torch and transformers are imported here only)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("klass-patch lm-eval: lm-evaluation-harness is not installed: pip install -e '.[lm-eval]' in a "
              "klass-patch checkout (the package is not on PyPI)", file=sys.stderr)
        return 2
    from .lm_eval import main as lm_eval_main
    return lm_eval_main(argv)


def _parser(argv) -> argparse.ArgumentParser:
    from . import __version__
    listing = "\n".join(f"  {name:<12}{text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(prog="klass-patch", usage="%(prog)s [-h] [--version] COMMAND ...",
                                     description=f"{DESCRIPTION}\n\ncommands:\n{listing}", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"klass-patch {__version__}")
    # listed in the description, one line each (argparse's own listing wraps a name as long as plot-steps)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="klass-patch")
    d = sub.add_parser("demo", description=COMMANDS["demo"])
    d.add_argument("--gen-length", type=int, default=32)
    d.add_argument("--steps", type=int, default=32)
    d.add_argument("--block-length", type=int, default=8)
    for name, text in (("install", "rewrite Dream's generation_utils.py / LLaDA's generate.py to accept alg='klass'"),
                       ("status", "say which upstream version each file is and whether it is patched"),
                       ("revert", "restore the original files byte for byte")):
        p = sub.add_parser(name, description=text, epilog=FILES_EPILOG)
        p.add_argument("--dream", action="append", default=[], metavar="PATH",
                       help="a Dream model folder or its generation_utils.py (repeatable)")
        p.add_argument("--llada", action="append", default=[], metavar="PATH",
                       help="LLaDA's generate.py or the folder holding it (repeatable)")
        if name == "install":
            p.add_argument("--dry-run", action="store_true", help="show the change (a diff); write nothing")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in FILE_COMMANDS and argv != ["--version"]:  # eval's options need its settings (and torch)
        from .evaluation.cli import add_subcommands
        add_subcommands(sub)
    sub.add_parser("lm-eval", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # every argument after it is lm-eval's
        return lm_eval_command(argv[1:])
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.gen_length, args.steps, args.block_length)
    if args.command in FILE_COMMANDS:
        return files(args.command, args.dream, args.llada, getattr(args, "dry_run", False))
    from .evaluation.cli import dispatch
    rc = dispatch(args)
    return 2 if rc is None else rc


if __name__ == "__main__":
    sys.exit(main())
