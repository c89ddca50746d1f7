"""Answer extraction and equivalence: GSM8K numbers, MATH expressions, the code of HumanEval/MBPP answers.

GSM8K follows ``parse_answer`` / ``parse_ground_truth_answer`` of the authors' ``src/utils.py``; MATH
follows the first stage of their ``extract_answer`` (``\\boxed{}`` first, then the text after the last
"answer is", then the last word holding a digit) and leaves equivalence to ``math-verify`` (symbolic,
with its LaTeX parser) instead of their hand-written normalisation; the code extraction follows their
``test_humaneval`` and ``evaluate_task``.
"""
from __future__ import annotations

import re
from typing import List, Optional

_NUMBER = re.compile(r"-?\d+\.?\d*")
_DECIMAL = re.compile(r"^-?\d+\.\d+$")


def _normalise_number(s: str) -> str:
    s = s.rstrip(".").replace("\n", "")
    if _DECIMAL.match(s):  # trailing zeros of decimals: 18.50 -> 18.5, 18.00 -> 18
        s = s.rstrip("0").rstrip(".")
    return s


def parse_gsm8k_answer(text: str) -> str:
    """The number a GSM8K generation answers ("" when there is none), as ``parse_answer`` does: in the text
    after the last "answer is", a ``\\boxed{}`` number first, else the first number there (the last number
    of the whole text when "answer is" is absent); commas dropped, trailing decimal zeros dropped.

    One deliberate difference: inside ``\\boxed{}`` the reference reads the number before removing commas
    and does not drop trailing zeros (``\\boxed{1,000}`` gives "1", ``\\boxed{18.0}`` "18.0", both scored
    wrong); here they give "1000" and "18", as outside a box.
    """
    parts = text.split("answer is")
    flagged = len(parts) > 1
    tail = parts[-1]
    boxed = re.search(r"\\boxed\{([^}]+)\}", tail)
    if boxed:
        content = boxed.group(1).strip().replace(",", "")
        number = _NUMBER.search(content)
        return _normalise_number(number.group(0)) if number else content
    numbers = _NUMBER.findall(tail.replace(",", ""))
    if not numbers:
        return ""
    return _normalise_number(numbers[0] if flagged else numbers[-1])


def gsm8k_gold(answer: str) -> Optional[str]:
    """The reference number of a GSM8K solution (``#### 1,234`` -> "1234"); a bare number is accepted too."""
    match = re.search(r"#### (-?[0-9.,]+)", answer)
    if match:
        return _normalise_number(match.group(1).strip().replace(",", ""))
    bare = answer.strip().replace(",", "")
    return _normalise_number(bare) if re.fullmatch(r"-?\d+\.?\d*", bare) else None


def boxed_contents(text: str) -> List[str]:
    """The contents of every ``\\boxed{...}`` with nested braces (``extract_boxed_answers`` of the reference)."""
    found = []
    for piece in text.split("boxed{")[1:]:
        depth = 0
        for i, ch in enumerate(piece):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth < 0:
                    found.append(piece[:i])
                    break
    return found


def last_boxed(text: str) -> Optional[str]:
    found = boxed_contents(text)
    return found[-1] if found else None


def extract_math_answer(text: str) -> str:
    """The final answer of a MATH generation as a LaTeX string ("" when there is none)."""
    if "boxed" in text:
        answer = last_boxed(text) or ""
    elif "answer is" in text:
        answer = text.split("answer is")[-1].strip()
        answer = answer.split(".\n")[0].strip().split(". ")[0]
    else:
        words = [w for w in text.split() if re.search(r"\d", w)]
        answer = words[-1] if words else ""
    answer = answer.strip().lstrip(":").strip().rstrip(".").rstrip("/")
    return answer.replace("\\$", "").replace("$", "").strip()


def _plain(s: str) -> str:
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("dfrac", "frac"), ("tfrac", "frac"), ("$", "")):
        s = s.replace(a, b)
    return re.sub(r"\s+", "", s).rstrip(".")


def math_equal(gold: Optional[str], answer: str) -> bool:
    """``answer`` means ``gold``: equal as text, or equivalent for math-verify (numbers, fractions,
    radicals, intervals, tuples and sets, ``x = 5`` read as ``5`` when needed)."""
    if not answer or gold is None:
        return False
    if _plain(gold) == _plain(answer):
        return True
    import threading

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere, run without them.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    candidates = [answer] + ([answer.split("=")[-1]] if "=" in answer else [])
    try:
        target = parse(f"${gold}$", extraction_config=config, parsing_timeout=timeout)
        if not target:
            return False
        return any(verify(target, parse(f"${c}$", extraction_config=config, parsing_timeout=timeout),
                          timeout_seconds=timeout) for c in candidates)
    except Exception:  # math-verify reports its own parse failures and timeouts as exceptions in places
        return False


def humaneval_code(generation: str) -> str:
    """The code of a HumanEval answer: the first fenced block (closed or not), else the whole text."""
    match = re.search(r"```(?:python)?\n(.*?)(?:```|$)", generation, re.DOTALL)
    return match.group(1).strip() if match else generation.strip()


def mbpp_code(generation: str) -> str:
    """The code of an MBPP answer: the first ```python block, else the whole text (``evaluate_task``)."""
    blocks = re.findall(r"```python(.*?)```", generation, re.DOTALL)
    return blocks[0] if blocks else generation
