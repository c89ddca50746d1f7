"""The evaluation package's public generation API (``klass_patch.evaluation.Generator``) and its module graph."""
import ast
from pathlib import Path

import torch

import klass_patch.evaluation as evaluation
from fixtures.eval import toys
from klass_patch.evaluation import Generator, encode, resolve_settings, split_history
from klass_patch.toy import llada_generate


def test_generator_is_public_and_resolves_llada_mask_id():
    """LLaDA settings without mask_id take the tokenizer's when the model's config has none."""
    tokenizer = toys.tokenizer()
    model = toys.llada_toy()
    s = resolve_settings("llada", "gsm8k", gen_length=16, steps=16, block_length=8, save_steps=True)
    assert s.mask_id is None and getattr(getattr(model, "config", None), "mask_token_id", None) is None
    generator = Generator(model, s, llada_generate, tokenizer=tokenizer)
    assert generator.settings.mask_id == toys.MASK and generator.rows == 1
    ids, mask = encode(tokenizer, ["ab", "abcd"], "llada", "cpu")
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    sequences, used, history = generator(ids[1:], mask[1:])
    assert sequences.shape == (1, 4 + 16) and len(used) == 1 and 1 <= used[0] <= 16
    assert not (sequences[:, 4:] == toys.MASK).any()  # the resolved mask id is the one the toy fills
    assert len(split_history(history, 0, 1)) == used[0]
    assert "Generator" in evaluation.__all__ and Generator.__doc__


def _imports(path: Path) -> set:
    """The sibling modules of the evaluation package that ``path`` imports (at any depth of the code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
    return found


def test_evaluation_modules_import_no_cycle():
    """No module of klass_patch.evaluation imports, directly or through others, one that imports it back."""
    package = Path(evaluation.__file__).parent
    graph = {p.stem: _imports(p) for p in package.glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in deps if m in graph} for name, deps in graph.items()}

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, seen + (m,))) for m in graph[start])

    assert [name for name in graph if reaches(name, name)] == []
