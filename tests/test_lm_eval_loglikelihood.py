"""The lm-eval model's ``loglikelihood``: ``is_greedy`` computed by default (lambada's ``acc`` and multiple-choice
``exact_match`` read it), and a request longer than ``max_length`` cut from the left, as lm-eval's HFLM does."""
import logging
from types import SimpleNamespace

import pytest

from fixtures.eval import toys


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed: pip install -e '.[lm-eval]'")
    pytest.importorskip("accelerate", reason="accelerate not installed: pip install -e '.[lm-eval]'")
    return toys.model_folder(tmp_path_factory.mktemp("ll") / "toy_llada", "llada")


@pytest.fixture(scope="module")
def lm(folder):
    from klass_patch.lm_eval import KlassLM

    return KlassLM(pretrained=str(folder), device="cpu", mc_num=8, mc_batch_size=8)  # check_greedy not given


def request(context, continuation, doc_id=0):
    return SimpleNamespace(args=(context, continuation), task_name="t", doc_id=doc_id, repeats=1)


def test_is_greedy_by_default(lm):
    """The toy counts on: 'efgh' is what greedy decoding writes after 'abcd', 'xbqa' and 'efgx' are not (the
    last differs only in its final token)."""
    results = lm.loglikelihood([request("abcd", "efgh"), request("abcd", "xbqa"), request("abcd", "efgx")])
    assert [greedy for _, greedy in results] == [True, False, False]
    assert all(type(greedy) is bool for _, greedy in results)


def test_check_greedy_false_says_so(folder, caplog):
    from klass_patch.lm_eval import KlassLM

    lm = KlassLM(pretrained=str(folder), device="cpu", mc_num=8, mc_batch_size=8, check_greedy="false")
    with caplog.at_level(logging.WARNING, logger="klass_patch.lm_eval"):
        assert lm.loglikelihood([request("abcd", "efgh")])[0][1] is False
    assert "check_greedy=false" in caplog.text and "read 0" in caplog.text


@pytest.mark.parametrize("args, message", [(dict(check_greedy="maybe"), "check_greedy must be one of"),
                                           (dict(max_length="1"), "max_length"),
                                           (dict(max_length="lots"), "max_length"),
                                           (dict(mc_num="many"), "mc_num")])
def test_bad_loglikelihood_args(folder, args, message):
    from klass_patch.lm_eval import KlassLM

    with pytest.raises(ValueError, match=message):
        KlassLM(pretrained=str(folder), device="cpu", **args)


def test_long_context_is_cut_from_the_left(lm, monkeypatch, caplog):
    """With max_length 8, 'qrstuvwabcd' + 'efgh' scores as 'abcd' + 'efgh' (same seed: same task and document)
    and warns; a continuation that leaves no room for context is an error naming max_length."""
    short = lm.loglikelihood([request("abcd", "efgh")])
    monkeypatch.setattr(lm, "max_length", 8)
    with caplog.at_level(logging.WARNING, logger="klass_patch.lm_eval"):
        cut = lm.loglikelihood([request("qrstuvwabcd", "efgh")])
    assert cut == short
    assert "truncating 7 tokens of the context from the left" in caplog.text
    with pytest.raises(ValueError, match="max_length 8"):
        lm.loglikelihood([request("abcd", "efghijkl")])


def reference_greedy(lm, prefix, target):
    """LLaDA eval_llada.py's suffix_greedy_prediction, written out: unmask the most confident masked position,
    one per forward, until none is left; then compare the whole continuation."""
    import torch

    x = torch.cat([prefix, torch.full_like(target, lm.mask_token)]).unsqueeze(0)
    for _ in range(len(target)):
        masked = x[0] == lm.mask_token
        probs = lm._logits(x)[0][masked].softmax(-1)
        conf, token = probs.max(-1)
        pos = masked.nonzero()[int(conf.argmax()), 0]
        x[0, pos] = token[int(conf.argmax())]
    return bool((x[0, len(prefix):] == target).all())


def test_greedy_check_is_llada_s(lm):
    """The check stops at the first written token that differs from the continuation: same answers as running
    every step."""
    pairs = [("abcd", "efgh"), ("abcd", "efgx"), ("abcd", "xfgh"), ("klmn", "opqrstu"), ("a b c", " d e"),
             ("hello", "world"), ("0123", "4567"), ("0123", "45"), ("xyz", "a")]
    seen = set()
    for context, continuation in pairs:
        prefix, target = lm._pair(context, continuation)
        expected = reference_greedy(lm, prefix, target)
        assert lm._greedy(prefix, target) is expected, (context, continuation)
        seen.add(expected)
    assert seen == {True, False}


LAMBADA_LIKE = """task: klass_toy_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lambada_like_acc_through_lm_eval(lm, tmp_path):
    """lm-eval's own loglikelihood task with lambada's metric (``acc`` is ``is_greedy``), on a task manager that
    indexes only this task: two of the three continuations are what greedy decoding writes."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    docs = [("abcd", "efgh"), ("klmn", "opqr"), ("abcd", "xbqa")]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in docs))
    (tmp_path / "klass_toy_lambada.yaml").write_text(LAMBADA_LIKE.format(data=data))
    expected = [lm._greedy(*lm._pair(c, t)) for c, t in docs]
    assert expected == [True, True, False]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["klass_toy_lambada"], task_manager=manager)
    assert results["results"]["klass_toy_lambada"]["acc,none"] == pytest.approx(2 / 3, rel=1e-12)
