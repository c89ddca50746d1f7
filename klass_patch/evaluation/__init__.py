"""Evaluation harness: ``klass-patch eval`` / ``plot-steps`` and their programmatic API.

    from klass_patch.evaluation import load_examples, resolve_settings, run_eval
    examples = load_examples("gsm8k", "gsm8k_test.jsonl", limit=50)
    settings = resolve_settings("llada", "gsm8k", alg="klass")        # the authors' GSM8K settings
    summary = run_eval(model, tokenizer, examples, settings, "out/llada_gsm8k", generate_fn=generate_module)

Generation alone (what ``run_eval`` and the lm-evaluation-harness model use; see ``generation``):

    from klass_patch.evaluation import Generator, encode
    generator = Generator(model, settings, generate_fn=generate_module, tokenizer=tokenizer)
    ids, mask = encode(tokenizer, prompts, settings.family, model.device)     # left-padded
    sequences, used_steps, history = generator(ids, mask)

One module per idea: ``settings`` (defaults, validation), ``data`` (datasets, prompts), ``scoring``
(answer extraction, equivalence), ``execution`` (running code against tests), ``generation`` (the sampler
call), ``runner`` (the loop, resume, summary), ``compare`` (the table), ``plotting`` (step logs),
``loading`` (models), ``cli``.
Optional dependencies (tqdm, math-verify, matplotlib, datasets) are imported only where used.
"""
from .data import Example, load_examples, make_examples, messages
from .generation import Generator, decode, encode, rows_per_call, split_history
from .runner import CodeExecutionRefused, run_eval
from .settings import CODE_DATASETS, DATASETS, FAMILIES, Settings, resolve_settings

__all__ = ["run_eval", "load_examples", "make_examples", "messages", "Example", "Settings", "resolve_settings",
           "Generator", "encode", "decode", "split_history", "rows_per_call",
           "CodeExecutionRefused", "DATASETS", "CODE_DATASETS", "FAMILIES"]
