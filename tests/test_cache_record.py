"""Generation on fixed tiny models as recorded from the landed code (issue 19, item 4).

tests/fixtures/cache_record/record.pt was written by tests/fixtures/cache_record/make.py at commit da3a701, before the
decoding loops were rewritten: LLaDA and Dream, KLASS and upstream's algorithms, no cache, ``"prefix"`` and
``"dual"``, a left-padded batch and one prompt, at temperature 0 (make.py's docstring lists the cases and how they
were checked to hold on any CPU). Every case must come out the same: tokens, ``used_steps``, the step records'
decisions (exactly) and floats (to float32 arithmetic's precision), and the model calls (rows and width of each).
"""
import sys
from pathlib import Path

import pytest
import torch

import klass_patch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures" / "cache_record"))
import make  # noqa: E402  (tests/fixtures/cache_record/make.py: the models and cases the record was made with)

pytest.importorskip("transformers", reason="the stand-in model files import transformers")
RECORD = torch.load(make.RECORD, weights_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The record's models. One thread: on a busy 2-core machine torch's second thread made these tiny forwards
    about 15 times slower (the record holds for any thread count: make.py checks its decisions under noise)."""
    threads = torch.get_num_threads()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    try:
        yield make.models(tmp_path_factory.mktemp("cache_record"), RECORD["configs"])
    finally:
        torch.set_grad_enabled(True)
        torch.set_num_threads(threads)


def test_the_record_covers_the_cases():
    assert sorted(RECORD["cases"]) == sorted(make.CASES)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_models_as_recorded(tiny, family):
    """The tiny models are the record's (else every case below would fail for a reason outside the sampler)."""
    klass_patch.apply()
    torch.testing.assert_close(tiny[family].probe(), RECORD["probe"][family], rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"the tiny {family} model is not the one of the record: {m}")


@pytest.mark.parametrize("name", list(make.CASES))
def test_case_as_recorded(tiny, name):
    family, kind, kw = make.CASES[name]
    klass_patch.apply()  # conftest reverts after every test; this patches the loaded sampler modules again
    now, then = make.outcome(tiny[family], kind, kw), RECORD["cases"][name]
    wrong = []
    if not torch.equal(now["sequences"], then["sequences"]):
        wrong.append(f"tokens {now['sequences'].tolist()} != recorded {then['sequences'].tolist()}")
    if (now["used_steps"] is None) != (then["used_steps"] is None) or (
            now["used_steps"] is not None and not torch.equal(now["used_steps"], then["used_steps"])):
        wrong.append(f"used_steps {now['used_steps']} != recorded {then['used_steps']}")
    if now["decisions"] != then["decisions"]:
        wrong.append("step records' decisions (step, candidates, decided) differ")
    elif then["floats"] is not None:
        try:
            torch.testing.assert_close(now["floats"], then["floats"], rtol=1e-5, atol=1e-7)
        except AssertionError as e:
            wrong.append(f"step records' confidence / KL: {e}")
    if now["calls"] != then["calls"]:
        wrong.append(f"model calls (rows, width) {now['calls']} != recorded {then['calls']}")
    assert not wrong, f"{name}: " + "; ".join(wrong)
