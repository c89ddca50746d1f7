"""One run at a time per eval output folder (``.klass-eval.lock``), and one line per example in results.jsonl."""
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

from fixtures.eval import toys
from klass_patch.evaluation import load_examples, resolve_settings, run_eval
from klass_patch.evaluation.cli import main
from klass_patch.evaluation.results import OutputBusy, load_results, merge_shards, output_lock, shard_path
from klass_patch.toy import llada_generate

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the lock is fcntl.flock (none on Windows)")


def _hold(out, ready, release):
    with output_lock(out):
        ready.set()
        release.wait(60)


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/'run's lock, as a running eval does; yields (folder, its PID)."""
    ctx = multiprocessing.get_context("fork")  # the child needs nothing new imported: it starts at once
    ready, release = ctx.Event(), ctx.Event()
    out = tmp_path / "run"
    proc = ctx.Process(target=_hold, args=(out, ready, release))
    proc.start()
    try:
        assert ready.wait(30)
        yield out, proc.pid
    finally:
        release.set()
        proc.join(30)


def small(family="llada", **kw):
    extra = dict(block_length=8) if family == "llada" else {}
    return resolve_settings(family, "gsm8k", gen_length=16, steps=16, **extra, **kw)


def test_second_run_fails_at_once_naming_the_folder_and_pid(holder):
    out, pid = holder
    model = toys.llada_toy()
    with pytest.raises(OutputBusy) as caught:
        run_eval(model, toys.tokenizer(), load_examples("gsm8k", FIXTURES / "gsm8k.jsonl"), small(), out,
                 generate_fn=llada_generate, progress=False)
    assert str(out) in str(caught.value) and f"PID {pid} " in str(caught.value)
    assert model.calls == 0 and not (out / "results.jsonl").exists() and not (out / "summary.json").exists()


def test_cli_second_run_fails_before_loading(holder, monkeypatch, capsys):
    """The command line takes the lock before the weights (and even the tokenizer) are loaded."""
    out, pid = holder
    folder = toys.model_folder(out.parent / "toy_dream", "dream")
    loaded = []
    monkeypatch.setattr("klass_patch.evaluation.loading.load_model", lambda *a, **k: loaded.append(a))
    argv = ["eval", "--model", str(folder), "--dataset", "gsm8k", "--data", str(FIXTURES / "gsm8k.jsonl"),
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{out} is being written by another klass-patch eval run (PID {pid} " in err and "Traceback" not in err
    assert loaded == []


def test_lock_released_after_a_run(tmp_path):
    """The same folder takes a second run once the first ended (the lock file stays, unlocked)."""
    for _ in range(2):
        run_eval(toys.llada_toy(), toys.tokenizer(), load_examples("gsm8k", FIXTURES / "gsm8k.jsonl", 1), small(),
                 tmp_path, generate_fn=llada_generate, progress=False)
    assert (tmp_path / ".klass-eval.lock").read_text().startswith(f"PID {os.getpid()} on ")


def test_resume_keeps_one_line_per_example(tmp_path):
    """results.jsonl holding an example twice (two runs into one folder, before the lock) is repaired on resume:
    the first line of each example is kept, and the summary counts each once."""
    examples = load_examples("gsm8k", FIXTURES / "gsm8k.jsonl")
    run_eval(toys.llada_toy(), toys.tokenizer(), examples, small(), tmp_path, generate_fn=llada_generate,
             progress=False)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    second = dict(json.loads(lines[0]), generation="another run's text")
    path.write_text("\n".join(lines + [json.dumps(second), lines[1]]) + "\n")
    said = []
    summary = run_eval(toys.llada_toy(), toys.tokenizer(), examples, small(), tmp_path, generate_fn=llada_generate,
                       progress=False, log=said.append)
    assert path.read_text().splitlines() == lines  # the repeats gone, the first lines kept, in their order
    assert summary["n"] == 3 and any("2 repeated example(s)" in m for m in said)


def test_merge_keeps_one_line_per_example(tmp_path):
    """Shards holding an example twice (and one results.jsonl has): one line each, the first found."""
    (tmp_path / "results.jsonl").write_text('{"id": "0", "v": "results"}\n')
    shard_path(tmp_path, 0).write_text('{"id": "1", "v": "r0 first"}\n{"id": "0", "v": "r0"}\n'
                                       '{"id": "1", "v": "r0 again"}\n')
    shard_path(tmp_path, 1).write_text('{"id": "2", "v": "r1"}\n{"id": "1", "v": "r1"}\n{"id": "2", "v": "r1 again"}\n')
    assert merge_shards(tmp_path, ["0", "1", "2"], log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows == [{"id": "0", "v": "results"}, {"id": "1", "v": "r0 first"}, {"id": "2", "v": "r1"}]
    assert load_results(tmp_path / "results.jsonl", log=lambda *_: None) == {r["id"]: r for r in rows}


def test_held_lock_is_reentrant_in_one_process(tmp_path):
    """The command line holds the lock and then calls run_eval, which takes it again: no self-deadlock."""
    with output_lock(tmp_path):
        with output_lock(tmp_path):
            pass
        ctx = multiprocessing.get_context("fork")
        ready, release = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_hold, args=(tmp_path, ready, release))
        started = time.time()
        proc.start()
        proc.join(30)
        assert proc.exitcode != 0 and not ready.is_set() and time.time() - started < 30  # still held: refused
