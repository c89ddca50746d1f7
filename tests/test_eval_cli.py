"""Evaluation command line: ``eval`` from a model folder, ``eval --compare``, ``plot-steps``, refusals."""
import argparse
import json
import struct
from pathlib import Path

import pytest
import torch

from fixtures.eval import toys
from klass_patch.evaluation import load_examples, resolve_settings, run_eval
from klass_patch.evaluation.cli import add_subcommands, dispatch, main
from klass_patch.toy import llada_generate

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SMALL = ["--gen-length", "16", "--steps", "16"]


def png_size(path):
    """(width, height) of a PNG, after checking its signature and header chunk."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def run_small(out, family, alg, save_steps=True, limit=None, **kw):
    tokenizer = toys.tokenizer()
    model = toys.llada_toy() if family == "llada" else toys.dream_toy()
    small = dict(gen_length=16, steps=16, **({"block_length": 8} if family == "llada" else {}))
    s = resolve_settings(family, "gsm8k", alg=alg, save_steps=save_steps, **{**small, **kw})
    return run_eval(model, tokenizer, load_examples("gsm8k", FIXTURES / "gsm8k.jsonl", limit), s, out,
                    generate_fn=llada_generate, model_name="toy", progress=False)


def test_wiring_into_another_parser(capsys):
    parser = argparse.ArgumentParser(prog="klass-patch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo")
    add_subcommands(sub)
    assert dispatch(parser.parse_args(["demo"])) is None  # not ours
    args = parser.parse_args(["eval", "--dataset", "gsm8k"])
    assert dispatch(args) == 2
    assert "--model is required" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_eval_from_a_model_folder(tmp_path, monkeypatch, capsys, family):
    """The whole command: family read from the config, remote code patched at load, LLaDA's generate.py
    falling back to the stand-in; then the same command again resumes with nothing left to do."""
    folder = toys.model_folder(tmp_path / f"toy_{family}_model", family)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["eval", "--model", str(folder), "--dataset", "gsm8k", "--data", str(FIXTURES / "gsm8k.jsonl"),
            "--limit", "2", "--out", str(out), "--save-steps", "--no-progress", "--device", "cpu", *SMALL]
    argv += ["--block-length", "8"] if family == "llada" else []
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"({family}) on gsm8k, 2 examples" in printed
    assert "kl_threshold       " + ("0.015" if family == "llada" else "0.001") in printed  # authors' defaults shown
    assert ("using klass-patch's stand-in" in printed) is (family == "llada")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == family and summary["n"] == 2 and summary["model"] == str(folder)
    assert summary["average_steps"] < 16  # KLASS ran (upstream's sampler would take all 16 steps)
    patched = {p["family"] for p in summary["versions"]["patched"]}
    assert family in patched
    assert main(argv) == 0
    assert "2 of 2 examples already done" in capsys.readouterr().out


def test_code_execution_refused_before_loading(tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path / "no_such_model"), "--dataset", "humaneval",
            "--data", str(FIXTURES / "humaneval.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "humaneval is scored by running the model's code" in err and "--allow-code-execution" in err


@pytest.mark.parametrize("extra,message", [
    (["--family", "llada", "--top-p", "0.9"], "top_p (--top-p) applies to Dream only"),
    (["--family", "llada", "--gen-length", "100"], "gen_length (100, --gen-length) must be a multiple of block_length"),
    (["--family", "dream", "--alg", "default"], "alg (--alg) must be one of klass, maskgit_plus, origin"),
    (["--family", "dream", "--conf-threshold", "1.5"], "conf_threshold (--conf-threshold) must be a number in [0, 1]"),
    (["--family", "dream", "--data", "missing.jsonl"], "--data: no such file"),
    (["--family", "llada", "--batch-size", "0"], "batch_size (--batch-size) must be an int >= 1"),
    (["--family", "llada", "--cache-refresh-every", "2"], "cache_refresh_every (--cache-refresh-every) applies to "
                                                           "--use-cache only"),
    (["--family", "dream", "--use-cache", "dual", "--alg", "origin"], "not origin"),
    (["--family", "dream", "--block-length", "8"], "applies to LLaDA (and Dream with --use-cache) only"),
    (["--family", "llada", "--use-cache", "dual", "--cache-refresh-every", "0"], "must be an int >= 1"),
    (["--limit", "0"], "no examples to evaluate"),
    ([], "--model: cannot load the config of"),
])
def test_bad_input_reported_before_loading(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(tmp_path / "no_such_model"), "--dataset", "gsm8k"]
    if "--data" not in extra:
        argv += ["--data", str(FIXTURES / "gsm8k.jsonl")]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def compare_rows(out):
    """The table's rows, by run number: the cells after the folder and method (split on 2+ spaces)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        cells = [c for c in line.split("  ") if c.strip()]
        rows[cells[0].strip()] = [c.strip() for c in cells[1:]]
    return lines[rule - 1].split("  "), rows


def test_compare_table(tmp_path, capsys):
    """One row per run with its folder (two runs of one method look alike otherwise); the time speed-up is
    the ratio of generation seconds per example, whatever the number of examples."""
    base = run_small(tmp_path / "base", "llada", "default", save_steps=False)
    fast = run_small(tmp_path / "klass", "llada", "klass", save_steps=False, limit=1)
    again = run_small(tmp_path / "klass_again", "llada", "klass", save_steps=False, limit=1)
    folders = [str(tmp_path / name) for name in ("base", "klass", "klass_again")]
    assert main(["eval", "--compare", *folders]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "toy on gsm8k"
    head, rows = compare_rows(out)
    assert [c.strip() for c in head if c.strip()] == ["run", "folder", "method", "n", "accuracy", "avg steps",
                                                      "step speed-up", "s/example", "time speed-up"]
    assert rows["1"][:6] == [folders[0], "default", "3", f"{base['accuracy']:.2f}", "16.00", "1.00x"]
    per_base, per_fast = base["wall_time_s"] / 3, fast["wall_time_s"] / 1
    assert rows["2"] == [folders[1], "klass (conf 0.6, KL 0.015, n 2)", "1", f"{fast['accuracy']:.2f}",
                         f"{fast['average_steps']:.2f}", f"{16 / fast['average_steps']:.2f}x", f"{per_fast:.3f}",
                         f"{per_base / per_fast:.2f}x"]
    assert rows["3"][:2] == [folders[2], rows["2"][1]] and again["n"] == 1
    assert "run 2 (" + folders[1] + ") counts 1 examples, run 1 3" in out
    assert "NOT COMPARABLE" not in out and "WARNING" not in out
    assert "settings that differ:" in out and "conf_threshold" in out.split("settings that differ:")[1]


def test_compare_refuses_speed_ups_across_tasks(tmp_path, capsys):
    """Runs that differ in more than the sampler (here gen_length and steps) get no speed-up, and a warning
    that names what differs; the batch size voids only the time speed-up."""
    run_small(tmp_path / "base", "llada", "default", save_steps=False)
    run_small(tmp_path / "long", "llada", "klass", save_steps=False, gen_length=32, steps=32)
    run_small(tmp_path / "batched", "llada", "default", save_steps=False, batch_size=3)
    assert main(["eval", "--compare", *(str(tmp_path / n) for n in ("base", "long", "batched"))]) == 0
    out = capsys.readouterr().out
    _, rows = compare_rows(out)
    assert rows["2"][5] == rows["2"][7] == "NOT COMPARABLE"
    assert rows["3"][5] == "1.00x" and rows["3"][7] == "NOT COMPARABLE"
    assert (f"WARNING: run 2 ({tmp_path / 'long'}) differs from run 1 in more than the sampler: gen_length 16 -> 32, "
            "steps 16 -> 32;") in out
    assert f"WARNING: run 3 ({tmp_path / 'batched'}) differs from run 1 in batch_size 1 -> 3;" in out
    differ = out.split("settings that differ:")[1].splitlines()
    assert differ[1].split() == ["run", "alg", "gen_length", "steps", "conf_threshold", "kl_threshold",
                                 "kl_history_length", "unmask_strategy", "batch_size"]
    assert differ[3].split() == ["1", "default", "16", "16", "-", "-", "-", "-", "1"]


def test_compare_notes_and_errors(tmp_path, capsys):
    run_small(tmp_path / "a", "llada", "default", save_steps=False)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary.update(complete=False, n=2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps(summary))
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"run 2 ({tmp_path / 'b'}) is unfinished (2 of 3 examples)" in out
    assert "settings that differ" not in out
    assert main(["eval", "--compare", str(tmp_path / "nothing")]) == 2
    assert "is not an eval output folder" in capsys.readouterr().err


def test_plot_steps(tmp_path, capsys):
    run_small(tmp_path / "run", "dream", "klass")
    log = tmp_path / "run" / "steps" / "0.jsonl"
    assert main(["plot-steps", str(log)]) == 0
    png = log.with_suffix(".png")
    assert f"wrote {png}" in capsys.readouterr().out
    width, height = png_size(png)
    assert width > 500 and height > 400
    # the eval folder: final KL of correct vs incorrect answers (make one "correct" to fill both groups)
    results = tmp_path / "run" / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    rows[0]["correct"] = True
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "figure.png"
    assert main(["plot-steps", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert png_size(out)[0] > 300
    import matplotlib.image

    image = matplotlib.image.imread(str(out))
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.01  # decodes, and is not blank


def test_plot_steps_errors(tmp_path, capsys):
    run_small(tmp_path / "run", "llada", "klass", save_steps=False)
    assert main(["plot-steps", str(tmp_path / "run")]) == 2
    assert "no final_kl values: run eval with --save-steps" in capsys.readouterr().err
    assert main(["plot-steps", str(tmp_path / "run" / "summary.json")]) == 2
    assert "is not a step log" in capsys.readouterr().err
    assert main(["plot-steps", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_use_cache_reaches_the_sampler_and_names_the_run(family):
    """--use-cache / --cache-refresh-every (and Dream's --block-length with a cache) go to the sampler call, and
    into the run's identity and label; a run without a cache keeps the identity it had before the cache existed."""
    from klass_patch.evaluation import Generator
    from klass_patch.evaluation.runner import make_run
    seen = {}

    def generate(model, prompt, attention_mask=None, **kw):
        seen.update(kw)
        return prompt

    class Dream:
        generation_config = None

        def diffusion_generate(self, ids, **kw):
            seen.update(kw)
            return ids

    extra = dict(block_length=8) if family == "dream" else {}
    s = resolve_settings(family, "gsm8k", use_cache="dual", cache_refresh_every=4, **extra)
    gen = Generator.__new__(Generator)  # the call only, without loading or patching anything
    gen.model, gen.s, gen.fn, gen.takes_mask = Dream(), s, generate, True
    gen(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))
    assert seen["use_cache"] == "dual" and seen["cache_refresh_every"] == 4
    assert seen["block_length"] == (8 if family == "dream" else 64)
    run = make_run(s, "m", "d")
    assert run["settings"]["use_cache"] == "dual" and run["method"].endswith("+ dual cache")
    plain = make_run(resolve_settings(family, "gsm8k"), "m", "d")
    assert "use_cache" not in plain["settings"] and "cache_refresh_every" not in plain["settings"]


class _Stop(Exception):
    pass


def _stop_loading(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize("environ,said", [({"ACCELERATE_USE_CPU": "True"}, True),
                                          ({"ACCELERATE_USE_CPU": "True", "WORLD_SIZE": "1"}, False),
                                          ({"ACCELERATE_USE_CPU": "False"}, False), ({}, False)])
def test_accelerate_cpu_launch_of_one_process_is_explained(tmp_path, monkeypatch, capsys, environ, said):
    """`accelerate launch --cpu --num_processes N` starts one process (ACCELERATE_USE_CPU, no WORLD_SIZE): eval
    says so and how to get N CPU processes."""
    from klass_patch.evaluation import distributed

    for name in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed.Dist, "setup", lambda self, device: None)  # no process group for this check
    monkeypatch.setattr("klass_patch.evaluation.loading.load_model", _stop_loading)
    folder = toys.model_folder(tmp_path / "toy_dream", "dream")
    with pytest.raises(_Stop):
        main(["eval", "--model", str(folder), "--dataset", "gsm8k", "--data", str(FIXTURES / "gsm8k.jsonl"),
              "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert ("accelerate launch --multi_gpu --num_processes N" in printed) is said
    assert ("torchrun --nproc_per_node N" in printed) is said
