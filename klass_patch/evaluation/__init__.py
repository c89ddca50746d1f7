"""Evaluation harness: ``klass-patch eval`` / ``plot-steps`` and their programmatic API.

    from klass_patch.evaluation import load_examples, resolve_settings, run_eval
    examples = load_examples("gsm8k", "gsm8k_test.jsonl", limit=50)
    settings = resolve_settings("llada", "gsm8k", alg="klass")        # the authors' GSM8K settings
    summary = run_eval(model, tokenizer, examples, settings, "out/llada_gsm8k", generate_fn=generate_module)

One module per idea: ``settings`` (defaults, validation), ``data`` (datasets, prompts), ``scoring``
(answer extraction, equivalence), ``execution`` (running code against tests), ``runner`` (the loop,
resume, summary), ``compare`` (the table), ``plotting`` (step logs), ``loading`` (models), ``cli``.
Optional dependencies (tqdm, math-verify, matplotlib, datasets) are imported only where used.
"""
from .data import Example, load_examples, make_examples, messages
from .runner import CodeExecutionRefused, run_eval
from .settings import CODE_DATASETS, DATASETS, FAMILIES, Settings, resolve_settings

__all__ = ["run_eval", "load_examples", "make_examples", "messages", "Example", "Settings", "resolve_settings",
           "CodeExecutionRefused", "DATASETS", "CODE_DATASETS", "FAMILIES"]
