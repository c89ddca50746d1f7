"""Data-parallel ``klass-patch eval`` on CPU: 2 processes (torchrun, gloo) write per example what 1 process
writes; a run whose process was killed mid-run resumes, on another number of processes, per example."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.eval import toys
from klass_patch.evaluation.cli import main
from klass_patch.evaluation.distributed import Dist
from klass_patch.evaluation.results import ShardFollower, merge_shards, shard_path

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
FIELDS = ("generation", "answer", "steps", "correct", "prompt")

pytest.importorskip("torch.distributed.run", reason="torch.distributed (torchrun) is needed for 2-process runs")


def eval_argv(folder, data, out, extra=()):
    return ["eval", "--model", str(folder), "--dataset", "gsm8k", "--data", str(data), "--out", str(out),
            "--no-progress", "--gen-length", "16", "--steps", "16", "--temperature", "2.0", *extra]


def torchrun(argv, **popen):
    """``torchrun --standalone --nproc_per_node 2 -m klass_patch <argv>`` (a free port each time)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "klass_patch", *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def by_id(out):
    rows = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)  # every example once
    return {r["id"]: {k: r.get(k) for k in FIELDS} for r in rows}


@pytest.fixture(scope="module")
def dream_folder(tmp_path_factory):
    return toys.model_folder(tmp_path_factory.mktemp("toy") / "toy_dream_model", "dream")


def test_two_processes_generate_what_one_does(tmp_path, dream_folder, capsys):
    """Temperature 2.0: every example draws from its own seed, so the split across processes changes nothing."""
    data = FIXTURES / "gsm8k.jsonl"
    proc = torchrun(eval_argv(dream_folder, data, tmp_path / "two"))
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert main(eval_argv(dream_folder, data, tmp_path / "one")) == 0
    one, two = by_id(tmp_path / "one"), by_id(tmp_path / "two")
    assert list(two) == list(one) == ["0", "1", "2"] and two == one
    assert len({r["generation"] for r in one.values()}) > 1  # the texts do differ per example (per seed)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["n"], summary["total"], summary["complete"], summary["world_size"]) == (3, 3, True, 2)
    assert summary["average_steps"] == json.loads((tmp_path / "one" / "summary.json").read_text())["average_steps"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".klass-eval.lock", "results.jsonl",
                                                                     "summary.json"]  # merged
    assert output.count("klass-patch eval:") == 1  # rank 0 speaks
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "one"), str(tmp_path / "two")]) == 0  # reads the merged run
    assert "note:" not in capsys.readouterr().out


def test_second_launch_fails_on_every_rank_and_leaves_the_first_runs_shards(tmp_path, dream_folder):
    """While a run holds the folder (here: this process), a 2-process launch into it fails at once on both
    ranks (rank 0 is refused the lock; rank 1 hears it, instead of waiting at a barrier), naming the folder and
    the holder's PID; the first run's live shard and results are left as they are (no merge, no unlink)."""
    from klass_patch.evaluation.results import output_lock

    out = tmp_path / "run"
    with output_lock(out):
        live = {shard_path(out, 1): '{"id": "1", "generation": "first run, rank 1"}\n',
                out / "results.jsonl": '{"id": "0", "generation": "first run"}\n'}
        for path, text in live.items():
            path.write_text(text)
        started = time.time()
        proc = torchrun(eval_argv(dream_folder, FIXTURES / "gsm8k.jsonl", out))
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode != 0, output
        message = f"{out} is being written by another klass-patch eval run (PID {os.getpid()} "
        assert output.count(message) == 2, output  # both ranks say it
        assert {path: path.read_text() for path in live} == live
        assert not (out / "summary.json").exists() and time.time() - started < 240


def _children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_resume_after_a_process_is_killed(tmp_path, dream_folder, capsys):
    """Kill rank 1 after its first example: the shards stay; a 1-process run merges them and does the rest."""
    data = tmp_path / "gsm8k.jsonl"
    lines = (FIXTURES / "gsm8k.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines * 3) + "\n")  # 9 examples
    out = tmp_path / "run"
    argv = eval_argv(dream_folder, data, out, ["--gen-length", "32", "--steps", "32"])
    proc = torchrun(argv, start_new_session=True)
    shard = shard_path(out, 1)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if shard.exists() and shard.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        rank1 = [w for w in _descendants(proc.pid) if " LOCAL_RANK=1 " in f" {_environ(w)} "]
        assert rank1, "rank 1's process not found"
        os.kill(rank1[0], signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    left = [p.name for p in out.iterdir() if p.name.startswith("results.rank")]
    assert "results.rank1.jsonl" in left  # killed before the merge
    before = {}
    for name in left:
        for line in Path(out, name).read_text().splitlines():
            if line.endswith("}"):
                record = json.loads(line)
                before[record["id"]] = {k: record.get(k) for k in FIELDS}
    assert 1 <= len(before) < 9
    # resumed on one process: the shards are merged, only the rest is generated
    assert main(argv) == 0
    assert f"{len(before)} of 9 examples already done, {9 - len(before)} to go" in capsys.readouterr().out
    after = by_id(out)
    assert sorted(after, key=int) == [str(i) for i in range(9)]  # each once (resumed ones appended)
    assert {i: after[i] for i in before} == before  # the killed run's examples kept as they were
    assert not [p for p in out.iterdir() if p.name.startswith("results.rank")]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n"], summary["complete"], summary["world_size"]) == (9, True, 1)


def _descendants(pid):
    found = _children(pid)
    return found + [d for c in found for d in _descendants(c)]


def _environ(pid):
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def test_merge_and_follow_shards(tmp_path):
    """Shards of any world size fold into results.jsonl in the examples' order; half lines are dropped."""
    (tmp_path / "results.jsonl").write_text('{"id": "2", "v": 1}\n')
    shard_path(tmp_path, 0).write_text('{"id": "0", "v": 1}\n{"id": "2", "v": 2}\n')
    shard_path(tmp_path, 3).write_text('{"id": "1", "v": 1}\n{"id": "3", "v"')
    follower = ShardFollower(tmp_path, [3])
    assert follower.poll() == [{"id": "1", "v": 1}] and follower.poll() == []
    assert merge_shards(tmp_path, ["0", "1", "2", "3"], log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows == [{"id": "0", "v": 1}, {"id": "1", "v": 1}, {"id": "2", "v": 1}]  # results.jsonl wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
    assert not merge_shards(tmp_path, [], log=lambda *_: None)


def test_dist_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert Dist.from_env() == Dist(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = Dist.from_env()
    assert (d.rank, d.world_size, d.local_rank, d.is_main) == (3, 4, 1, False)
    assert d.device("cpu") == "cpu" and d.device("cuda") == "cuda:1" and d.device("cuda:5") == "cuda:5"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="do not fit together"):
        Dist.from_env()
