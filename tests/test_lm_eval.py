"""The lm-evaluation-harness model (``--model klass``): a local generate_until task through
``klass-patch lm-eval`` on a toy model folder, the Monte Carlo loglikelihood, and the missing-extra message."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fixtures.eval import toys

TASK = """task: klass_toy_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
QUESTIONS = [("Ann has 16 eggs and eats 3. How many are left?", "13"), ("What is 2 + 2?", "4"),
             ("Count on: a b c", "d"), ("Say hi", "hi"), ("Fifth letter?", "e")]


def test_missing_lm_eval_is_reported(monkeypatch, capsys):
    from klass_patch.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["lm-eval", "--model", "klass"]) == 2
    assert "pip install -e '.[lm-eval]' in a klass-patch checkout" in capsys.readouterr().err


def _need_lm_eval():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed: pip install -e '.[lm-eval]'")
    pytest.importorskip("accelerate", reason="accelerate not installed: pip install -e '.[lm-eval]'")


@pytest.mark.parametrize("family", ["llada"])  # Dream: test_dream_generate_until (one subprocess is enough)
def test_local_task_through_klass_patch_lm_eval(tmp_path, family):
    _need_lm_eval()
    folder = toys.model_folder(tmp_path / f"toy_{family}", family)
    task = tmp_path / "task"
    task.mkdir()
    data = task / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    (task / "klass_toy_qa.yaml").write_text(TASK.format(data=data))
    args = f"pretrained={folder},gen_length=16,steps=16" + (",block_length=8" if family == "llada" else "")
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "klass_patch", "lm-eval", "--model", "klass", "--model_args", args,
           "--tasks", "klass_toy_qa", "--include_path", str(task), "--limit", "4", "--batch_size", "2",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "klass: average forwards per request" in done.stdout
    [results] = list(out.rglob("results_*.json"))
    [samples] = list(out.rglob("samples_klass_toy_qa_*.jsonl"))
    saved = json.loads(results.read_text())
    metrics = saved["results"]["klass_toy_qa"]
    assert "exact_match,none" in metrics
    info = saved["config"]["klass"]
    assert info["requests"] == 4 and info["family"] == family and info["settings"]["alg"] == "klass"
    assert 1 <= info["average_forwards"] < 16  # KLASS decides several tokens per forward on the toy
    assert metrics["forwards,none"] == info["per_task"]["klass_toy_qa"]["average_forwards"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == [0, 1, 2, 3]
    assert all("\n\n" not in r["resps"][0][0] for r in rows)  # `until` applied
    assert re.search(r"\|\s*forwards\s*\|", done.stdout)  # next to lm-eval's metrics in its table


@pytest.fixture(scope="module")
def llada_lm(tmp_path_factory):
    _need_lm_eval()
    from klass_patch.lm_eval import KlassLM

    folder = toys.model_folder(tmp_path_factory.mktemp("lm") / "toy_llada", "llada")
    return KlassLM(pretrained=str(folder), gen_length=16, steps=16, block_length=8, batch_size=3, device="cpu",
                   mc_num=16, mc_batch_size=8, check_greedy=True)


def request(*args, doc_id=0):
    return SimpleNamespace(args=args, task_name="t", doc_id=doc_id, repeats=1)


def test_loglikelihood_monte_carlo(llada_lm):
    """The toy counts: 'efgh' after 'abcd' is far likelier than 'xbqa', and is what greedy decoding writes."""
    (good, greedy), (bad, not_greedy) = llada_lm.loglikelihood([request("abcd", "efgh"), request("abcd", "xbqa")])
    assert good < 0 and bad < good - 5
    assert greedy is True and not_greedy is False
    again = llada_lm.loglikelihood([request("abcd", "efgh")])[0][0]
    assert again == good  # seeded per request
    with pytest.raises(NotImplementedError, match="wikitext"):
        llada_lm.loglikelihood_rolling([request("abc")])


def test_generate_until_batches_and_stops(llada_lm):
    prompts = ["Q: one\nA:", "Q: a longer question here\nA:", "Q: x\nA:"]
    free = llada_lm.generate_until([request(p, {"until": []}, doc_id=i) for i, p in enumerate(prompts)])
    assert all(len(t) > 4 for t in free)
    stop = free[1][3]
    cut = llada_lm.generate_until([request(p, {"until": [stop]}, doc_id=i) for i, p in enumerate(prompts)])
    assert cut[1] == free[1].split(stop)[0] and len(cut[1]) <= 3
    alone = llada_lm.generate_until([request(prompts[1], {"until": []}, doc_id=1)])
    assert alone == [free[1]]  # batched with left padding, as alone
    assert llada_lm.forwards_report()["requests"] == 7


def test_dream_generate_until(tmp_path):
    _need_lm_eval()
    from klass_patch.lm_eval import KlassLM

    folder = toys.model_folder(tmp_path / "toy_dream", "dream")
    lm = KlassLM(pretrained=str(folder), gen_length=16, steps=16, device="cpu", batch_size=2)
    assert lm.family == "dream" and lm.rows == 1  # Dream's default temperature 0.2: one request at a time
    texts = lm.generate_until([request("Q: one\nA:", {"until": ["\n\n"]}, doc_id=i) for i in range(2)])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == lm.generate_until([request("Q: one\nA:", {"until": ["\n\n"]}, doc_id=i) for i in range(2)])
    report = lm.forwards_report()
    assert report["requests"] == 4 and 1 <= report["average_forwards"] < 16
