"""Evaluation runner: end to end on tiny models for both families, scoring, resume, refusal, step logs."""
import json
from pathlib import Path

import pytest

from fixtures.eval import toys
from klass_patch.evaluation import CodeExecutionRefused, load_examples, resolve_settings, run_eval
from klass_patch.evaluation.generation import rows_per_call
from klass_patch.evaluation.results import load_results
from klass_patch.toy import llada_generate

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
FILES = {"gsm8k": "gsm8k.jsonl", "math500": "math500.jsonl", "humaneval": "humaneval.jsonl", "mbpp": "mbpp.json"}
SMALL = {"llada": dict(gen_length=16, steps=16, block_length=8), "dream": dict(gen_length=16, steps=16)}
RECORD_KEYS = {"id", "prompt", "generation", "answer", "gold", "correct", "steps", "seconds", "tokens"}


@pytest.fixture(scope="module")
def tokenizer():
    return toys.tokenizer()


def examples(dataset, limit=None):
    return load_examples(dataset, FIXTURES / FILES[dataset], limit)


def settings(family, dataset, **kw):
    return resolve_settings(family, dataset, **{**SMALL[family], **kw})


def toy(family):
    return toys.llada_toy() if family == "llada" else toys.dream_toy()


def records(out):
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family,alg", [("llada", "klass"), ("llada", "default"), ("dream", "klass"),
                                        ("dream", "maskgit_plus")])
def test_end_to_end_toy_model(tmp_path, tokenizer, family, alg):
    model = toy(family)
    s = settings(family, "gsm8k", alg=alg, save_steps=True)
    summary = run_eval(model, tokenizer, examples("gsm8k"), s, tmp_path, generate_fn=llada_generate, progress=False)
    rows = records(tmp_path)
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    for r in rows:
        assert RECORD_KEYS <= set(r) and r["tokens"] == 16 and r["seconds"] > 0
        assert r["prompt"] == ("<system>Your task is to answer the question below. Give step by step reasoning before "
                               "you answer, and when you're ready to answer, please use the format 'The final answer "
                               f"is'.\n<user>{examples('gsm8k')[int(r['id'])].question}\n<assistant>")
        assert r["correct"] is (r["answer"] == r["gold"])
        log = tmp_path / r["steps_log"]
        steps = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(steps) == r["steps"]  # one record per forward
        assert sum(rec["decoded_tokens_num"] for rec in steps) == 16  # every generated position decided once
        assert r["final_kl"] >= 0
    assert 1 <= min(r["steps"] for r in rows)
    if alg == "klass":
        assert max(r["steps"] for r in rows) < 16  # KLASS decides several tokens per forward on the toy
    else:
        assert all(r["steps"] == 16 for r in rows)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["n"] == saved["total"] == 3 and saved["complete"]
    assert saved["average_steps"] == round(sum(r["steps"] for r in rows) / 3, 2)
    assert saved["tokens_per_second"] == pytest.approx(48 / sum(r["seconds"] for r in rows), rel=1e-2)
    assert saved["run"]["settings"]["alg"] == alg and saved["run"]["settings"]["gen_length"] == 16
    assert saved["settings"] == dict(s.to_dict(), mask_id=toys.MASK if family == "llada" else None)
    assert saved["versions"]["torch"] and saved["versions"]["klass-patch"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_scripted_answers_are_scored(tmp_path, tokenizer, family):
    """A model that always answers 13: GSM8K examples 0 and 2 are right, 1 is not (batched, left-padded)."""
    model = toys.scripted(family, "13 - 0 = 13. The final answer is 13", 48)
    s = settings(family, "gsm8k", gen_length=48, steps=48, batch_size=2,
                 **({"block_length": 16} if family == "llada" else {}))
    summary = run_eval(model, tokenizer, examples("gsm8k"), s, tmp_path, generate_fn=llada_generate, progress=False)
    rows = records(tmp_path)
    assert [r["generation"] for r in rows] == ["13 - 0 = 13. The final answer is 13"] * 3
    assert [(r["answer"], r["correct"]) for r in rows] == [("13", True), ("13", False), ("13", True)]
    assert summary["correct"] == 2 and summary["accuracy"] == 66.67


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_math500_scored_by_equivalence(tmp_path, tokenizer, family):
    model = toys.scripted(family, "So the sum is \\boxed{0.75}", 32)
    s = settings(family, "math500", gen_length=32, steps=32)
    summary = run_eval(model, tokenizer, examples("math500"), s, tmp_path, generate_fn=llada_generate, progress=False)
    scored = [(r["answer"], r["correct"]) for r in records(tmp_path)]
    assert scored == [("0.75", True), ("0.75", False), ("0.75", False)]
    assert summary["correct"] == 1


@pytest.mark.parametrize("family,dataset,second", [("llada", "humaneval", "failed: AssertionError"),
                                                   ("dream", "mbpp", "failed: NameError: name 'root' is not defined")])
def test_code_datasets_execute_the_answers(tmp_path, tokenizer, family, dataset, second):
    model = toys.scripted(family, "```python\ndef add(a, b):\n    return a + b\n```", 64)
    s = settings(family, dataset, gen_length=64, steps=64, **({"block_length": 32} if family == "llada" else {}))
    summary = run_eval(model, tokenizer, examples(dataset), s, tmp_path, generate_fn=llada_generate,
                       allow_code_execution=True, progress=False)
    rows = records(tmp_path)
    assert rows[0]["answer"].strip() == "def add(a, b):\n    return a + b"
    assert (rows[0]["correct"], rows[0]["exec"]) == (True, "passed")
    assert (rows[1]["correct"], rows[1]["exec"]) == (False, second)  # neg() has no body / root() is missing
    assert summary["accuracy"] == 50.0


@pytest.mark.parametrize("dataset", ["humaneval", "mbpp"])
def test_code_datasets_refused_without_permission(tmp_path, tokenizer, dataset):
    model = toys.llada_toy()
    with pytest.raises(CodeExecutionRefused, match="allow-code-execution"):
        run_eval(model, tokenizer, examples(dataset), settings("llada", dataset), tmp_path / "out",
                 generate_fn=llada_generate, progress=False)
    assert model.calls == 0 and not (tmp_path / "out").exists()


def test_resume_skips_finished_examples(tmp_path, tokenizer):
    s = settings("llada", "gsm8k")
    first = toys.llada_toy()
    run_eval(first, tokenizer, examples("gsm8k", limit=2), s, tmp_path, generate_fn=llada_generate, progress=False)
    before = records(tmp_path)
    assert len(before) == 2 and json.loads((tmp_path / "summary.json").read_text())["total"] == 2
    # an interrupted write: half a line at the end
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"id": "2", "prompt": "cut sh')
    again = toys.llada_toy()
    messages = []
    summary = run_eval(again, tokenizer, examples("gsm8k"), s, tmp_path, generate_fn=llada_generate,
                       progress=False, log=messages.append)
    after = records(tmp_path)
    assert [r["id"] for r in after] == ["0", "1", "2"]
    assert after[:2] == before  # untouched
    assert again.calls == after[2]["steps"]  # only the missing example was generated
    assert summary["n"] == 3 and summary["complete"]
    assert any("dropped 1 incomplete line" in m for m in messages)
    assert any("2 of 3 examples already done" in m for m in messages)
    # everything done: nothing generated, same summary numbers
    third = toys.llada_toy()
    again_summary = run_eval(third, tokenizer, examples("gsm8k"), s, tmp_path, generate_fn=llada_generate,
                             progress=False, log=messages.append)
    assert third.calls == 0 and again_summary["accuracy"] == summary["accuracy"]


def test_resume_refuses_other_settings(tmp_path, tokenizer):
    run_eval(toys.llada_toy(), tokenizer, examples("gsm8k", 1), settings("llada", "gsm8k"), tmp_path,
             generate_fn=llada_generate, progress=False)
    model = toys.llada_toy()
    with pytest.raises(ValueError, match=r"holds a run with other settings \(kl_threshold: 0.015 -> 0.02\)"):
        run_eval(model, tokenizer, examples("gsm8k"), settings("llada", "gsm8k", kl_threshold=0.02), tmp_path,
                 generate_fn=llada_generate, progress=False)
    assert model.calls == 0
    # batch size and step logs do not change what is generated: resuming with them is fine
    run_eval(toys.llada_toy(), tokenizer, examples("gsm8k"), settings("llada", "gsm8k", batch_size=2), tmp_path,
             generate_fn=llada_generate, progress=False)
    assert len(records(tmp_path)) == 3


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_random_sampling_same_text_at_any_batch_size_and_on_resume(tmp_path, tokenizer, family):
    """At temperature > 0 example i draws from its own seed (seed + i): batch sizes 1, 2 and 3, and a run
    stopped after one example then resumed, write the same texts; another seed writes others."""
    said = []

    def generations(out, seed=0, batch_size=1, limit=None):
        s = settings(family, "gsm8k", temperature=2.0, seed=seed, batch_size=batch_size)
        run_eval(toy(family), tokenizer, examples("gsm8k", limit), s, tmp_path / out, generate_fn=llada_generate,
                 progress=False, log=said.append)
        return [r["generation"] for r in records(tmp_path / out)]

    alone = generations("alone")
    assert generations("other_seed", seed=1) != alone  # the toy's texts do depend on the random draws
    assert generations("batch2", batch_size=2) == alone
    assert generations("batch3", batch_size=3) == alone
    assert generations("resumed", batch_size=2, limit=1) == alone[:1]  # stopped after example 0
    assert generations("resumed", batch_size=2) == alone
    assert any("each example is generated alone" in m for m in said)


def test_batches_only_where_nothing_is_drawn_at_random():
    assert rows_per_call(settings("llada", "gsm8k", batch_size=4)) == 4  # temperature 0: batched
    assert rows_per_call(settings("llada", "gsm8k", batch_size=4, temperature=0.5)) == 1
    assert rows_per_call(settings("llada", "gsm8k", batch_size=4, alg="random")) == 1
    assert rows_per_call(settings("dream", "gsm8k", batch_size=4)) == 1  # Dream's default temperature 0.2
    assert rows_per_call(settings("dream", "gsm8k", batch_size=4, temperature=0.0)) == 4
    assert rows_per_call(settings("dream", "gsm8k", batch_size=4, temperature=0.0, alg="origin")) == 1


def test_load_results_repairs_the_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "correct": true}\n{"id": "b", "corr')
    done = load_results(path, log=lambda *_: None)
    assert list(done) == ["a"]
    assert path.read_text() == '{"id": "a", "correct": true}\n'


def test_bad_settings_raise_before_any_forward(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"alg \(--alg\) must be one of klass, maskgit_plus, origin, topk_margin, "
                                         r"entropy for dream, got 'default'"):
        resolve_settings("dream", "gsm8k", alg="default")
    with pytest.raises(ValueError,
                       match=r"block_length \(--block-length\) applies to LLaDA \(and Dream with --use-cache\) only"):
        resolve_settings("dream", "gsm8k", block_length=32)
    with pytest.raises(ValueError, match=r"conf_threshold \(--conf-threshold\) applies to alg='klass' only"):
        resolve_settings("llada", "gsm8k", alg="default", conf_threshold=0.5)
    with pytest.raises(ValueError, match=r"kl_threshold \(--kl-threshold\) must be a number > 0"):
        resolve_settings("llada", "gsm8k", kl_threshold=0)
    with pytest.raises(ValueError, match=r"top_p \(--top-p\) must be a number in \(0.0, 1.0\]"):
        resolve_settings("dream", "gsm8k", top_p=1.5)
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be an int >= 1"):
        resolve_settings("llada", "gsm8k", batch_size=0)
    with pytest.raises(ValueError, match=r"steps \(102, --steps\) must be a multiple of the number of blocks"):
        resolve_settings("llada", "gsm8k", steps=102, gen_length=256, block_length=64, alg="default")
    with pytest.raises(ValueError, match=r"LLaDA needs generate_fn"):
        run_eval(toys.llada_toy(), tokenizer, examples("gsm8k"), settings("llada", "gsm8k"), tmp_path,
                 progress=False)


def test_authors_defaults():
    s = resolve_settings("llada", "gsm8k")
    assert (s.alg, s.gen_length, s.block_length, s.steps, s.temperature) == ("klass", 256, 64, 256, 0.0)
    assert (s.conf_threshold, s.kl_threshold, s.kl_history_length, s.unmask_strategy) == (0.6, 0.015, 2, "all")
    d = resolve_settings("dream", "gsm8k")
    assert (d.gen_length, d.steps, d.temperature, d.top_p, d.block_length) == (256, 256, 0.2, 0.95, None)
    assert (d.conf_threshold, d.kl_threshold, d.kl_history_length) == (0.9, 0.001, 2)
    assert [(resolve_settings(f, ds).conf_threshold, resolve_settings(f, ds).kl_threshold)
            for f in ("llada", "dream") for ds in ("math500", "humaneval", "mbpp")] == [
        (0.6, 0.01), (0.9, 0.01), (0.7, 0.01), (0.9, 0.005), (0.8, 0.001), (0.9, 0.001)]
    base = resolve_settings("dream", "gsm8k", alg="maskgit_plus")
    assert base.conf_threshold is None and base.label() == "maskgit_plus"


OLD_GENERATE = '''
KLASS_PATCH_STANDIN = True
from klass_patch.toy import llada_generate as _new


def get_num_transfer_tokens(mask_index, steps):
    return _new.get_num_transfer_tokens(mask_index, steps)


def generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0., cfg_scale=0.,
             remasking='low_confidence', mask_id=126336):
    return _new.generate(model, prompt, None, steps, gen_length, block_length, temperature, cfg_scale, remasking,
                         mask_id)
'''


def test_llada_generate_without_attention_mask(tmp_path, tokenizer):
    """LLaDA's generate.py before 2025-10 takes no attention_mask: batch 1 works, batches are refused."""
    from conftest import load_file

    path = tmp_path / "generate.py"
    path.write_text(OLD_GENERATE)
    module = load_file(path)
    model = toys.llada_toy()
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) > 1 needs a LLaDA generate\(\) that takes "
                                         r"attention_mask"):
        run_eval(model, tokenizer, examples("gsm8k"), settings("llada", "gsm8k", batch_size=2), tmp_path / "a",
                 generate_fn=module, progress=False)
    assert model.calls == 0
    summary = run_eval(model, tokenizer, examples("gsm8k", 1), settings("llada", "gsm8k"), tmp_path / "b",
                       generate_fn=module.generate, progress=False)
    assert summary["n"] == 1 and model.calls == summary["average_steps"] < 16
