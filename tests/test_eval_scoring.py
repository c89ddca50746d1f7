"""Evaluation: answer extraction, equivalence, code extraction, datasets and the authors' prompts."""
import gzip
import json
import sys
import types
from pathlib import Path

import pytest

from klass_patch.evaluation import data
from klass_patch.evaluation.scoring import (
    extract_math_answer,
    gsm8k_gold,
    humaneval_code,
    math_equal,
    mbpp_code,
    parse_gsm8k_answer,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"

GSM8K = [
    # (generation, parsed answer)
    ("Janet has 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = $18.\nThe final answer is 18.", "18"),
    ("The final answer is $1,234.", "1234"),
    ("He pays 3.50 + 2 = 5.50 dollars.\nThe final answer is 5.50", "5.5"),
    ("The answer is 7.0", "7"),
    ("The final answer is: 0.25", "0.25"),
    ("So the total is\n\\boxed{-7}", "-7"),
    ("The final answer is \\boxed{1,000}", "1000"),  # comma inside the box (the reference reads "1")
    ("The final answer is \\boxed{18.00}.", "18"),
    ("The final answer is \\boxed{\\$42}", "42"),
    ("The temperature fell to -12 degrees. The final answer is -12 degrees.", "-12"),
    ("The final answer is 42. Check: 40 + 2 = 42 and 2 * 21 = 42", "42"),  # first number after "answer is"
    ("One answer is 5, but the final answer is 6", "6"),  # the last "answer is"
    ("First 12 apples, then 15, so 20 in all", "20"),  # no "answer is": the last number
    ("We get 1,250,000 people", "1250000"),
    ("I do not know how to solve this.", ""),
    ("", ""),
]


@pytest.mark.parametrize("generation,expected", GSM8K)
def test_gsm8k_answer_extraction(generation, expected):
    assert parse_gsm8k_answer(generation) == expected


@pytest.mark.parametrize("solution,expected", [
    ("16 - 3 = 13\n#### 13", "13"), ("#### 1,000", "1000"), ("#### 3.50", "3.5"), ("#### -5", "-5"),
    ("2,500", "2500"), ("no number here", None),
])
def test_gsm8k_gold(solution, expected):
    assert gsm8k_gold(solution) == expected


MATH_EXTRACT = [
    ("So $x = \\boxed{\\frac{7}{2}}$.", "\\frac{7}{2}"),
    ("First \\boxed{1}, then corrected: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
     "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The final answer is: 12. That is all.", "12"),
    ("The answer is $\\$18.90$.\nDone", "18.90"),
    ("we find 3 and then 5/2", "5/2"),
    ("I cannot solve it", ""),
]


@pytest.mark.parametrize("generation,expected", MATH_EXTRACT)
def test_math_answer_extraction(generation, expected):
    assert extract_math_answer(generation) == expected


MATH_EQUAL = [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{14}{3}", "\\dfrac{14}{3}", True),
    ("\\frac{14}{3}", "14/3", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}2", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    ("10", "10.0", True),
    ("5", "x = 5", True),
    ("2x+1", "1 + 2x", True),
    ("90^\\circ", "90", True),
    ("\\text{(C)}", "C", True),
    ("1,2,3", "3, 2, 1", True),  # "separated by commas" answers: a set
    ("5", "6", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("\\pi", "3.14", False),
    ("(1, 2)", "(2, 1)", False),
    ("3", "", False),
    (None, "3", False),
]


@pytest.mark.parametrize("gold,answer,expected", MATH_EQUAL)
def test_math_equivalence(gold, answer, expected):
    assert math_equal(gold, answer) is expected


def test_math_equivalence_off_the_main_thread():
    """math-verify's own timeouts need the main thread; the harness may run in another one."""
    import threading

    found = []
    worker = threading.Thread(target=lambda: found.append((math_equal("\\frac{1}{2}", "0.5"), math_equal("5", "6"))))
    worker.start()
    worker.join()
    assert found == [(True, False)]


def test_code_extraction():
    fenced = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert humaneval_code(fenced) == "def add(a, b):\n    return a + b"
    assert humaneval_code("```\ndef f():\n    return 1\n") == "def f():\n    return 1"  # unclosed fence
    assert humaneval_code("    return a + b\n") == "return a + b"  # no fence: stripped, as the reference
    assert mbpp_code(fenced) == "\ndef add(a, b):\n    return a + b\n"
    assert mbpp_code("def f(): return 1") == "def f(): return 1"


def test_authors_prompts():
    gsm = data.load_examples("gsm8k", FIXTURES / "gsm8k.jsonl")
    msgs = data.messages("gsm8k", gsm[0])
    assert msgs == [
        {"role": "system", "content": "Your task is to answer the question below. Give step by step reasoning "
                                      "before you answer, and when you're ready to answer, please use the format "
                                      "'The final answer is'."},
        {"role": "user", "content": "Ann has 16 eggs and eats 3. How many are left?"}]
    math = data.load_examples("math500", FIXTURES / "math500.jsonl")
    assert data.messages("math500", math[0])[0] == msgs[0]
    he = data.load_examples("humaneval", FIXTURES / "humaneval.jsonl")
    assert data.messages("humaneval", he[0]) == [
        {"role": "system", "content": "You complete only Python code."},
        {"role": "user", "content": he[0].raw["prompt"]}]
    mbpp = data.load_examples("mbpp", FIXTURES / "mbpp.json")
    assert data.messages("mbpp", mbpp[0]) == [{"role": "user", "content": (
        "You are an expert Python programmer, and here is your task: Write a function to add two numbers. "
        "Your code should pass these tests:\n\n['assert add(1, 2) == 3', 'assert add(0, 0) == 0']\n[BEGIN]")}]


def test_examples_and_gold_answers():
    gsm = data.load_examples("gsm8k", FIXTURES / "gsm8k.jsonl")
    assert [(e.id, e.gold) for e in gsm] == [("0", "13"), ("1", "1000"), ("2", "13")]
    math = data.load_examples("math500", FIXTURES / "math500.jsonl", limit=2)
    assert [e.gold for e in math] == ["\\frac{3}{4}", "\\frac{7}{2}"]  # the answer field, else the last box
    assert [e.id for e in data.load_examples("mbpp", FIXTURES / "mbpp.json")] == ["11", "12"]
    assert [e.id for e in data.load_examples("humaneval", FIXTURES / "humaneval.jsonl")] == ["Toy/0", "Toy/1"]


def test_data_formats(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    with gzip.open(tmp_path / "lines.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for name in ("list.json", "wrapped.json", "lines.jsonl.gz"):
        assert [e.question for e in data.load_examples("gsm8k", tmp_path / name)] == [r["question"] for r in records]


@pytest.mark.parametrize("content,message", [
    ('{"question": "q"}\n', r"example 0 of gsm8k lacks the field 'answer'"),
    ('{"question": "q", "answer": "#### 1"}\nnot json\n', r"line 2 is not JSON"),
    ('{"prompt": "p", "test_list": []}\n', r"lacks the field 'task_id'"),
    ('{"question": "q", "answer": "about ten"}\n', r"example 0 of gsm8k has no '#### <number>' in its answer"),
    ('[{"problem": "p", "solution": "It is 4."}]', r"example 0 of math500 has no 'answer' and no \\boxed"),
])
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    dataset = "mbpp" if "test_list" in content else "math500" if "problem" in content else "gsm8k"
    with pytest.raises(ValueError, match=message):
        data.load_examples(dataset, path)


def test_bad_data_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"--data: no such file"):
        data.load_examples("gsm8k", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"limit \(--limit\) must be an int >= 0"):
        data.load_examples("gsm8k", FIXTURES / "gsm8k.jsonl", limit=-1)
    with pytest.raises(ValueError, match=r"dataset \(--dataset\) must be one of gsm8k, math500, humaneval, mbpp"):
        data.make_examples("math", [])


def test_public_datasets_through_the_datasets_library(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"task_id": 2, "prompt": "Write f.", "test_list": ["assert f() == 1"], "code": "def f(): return 1"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert [e.id for e in data.load_examples("mbpp")] == ["2"]
    assert calls == [("google-research-datasets/mbpp", "sanitized", "test")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"no --data file given and the `datasets` package is not installed"):
        data.load_examples("gsm8k")
