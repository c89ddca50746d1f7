"""bench/gpu_bench.py off the GPU: its smoke mode (--device cpu --tiny) runs every configuration, its model builder
(meta device, to_empty, random weights) gives a working model, and without CUDA it says so before building."""
import json
from pathlib import Path

import pytest
import torch

from conftest import load_file

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench.py"
pytest.importorskip("transformers", reason="the model code imports transformers")


@pytest.fixture(scope="module")
def gb():
    return load_file(BENCH)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_cpu_tiny(gb, one_thread, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = gb.main(["--device", "cpu", "--tiny", "--batch", "2", "--max-forwards", "4", "--threads", "1",
                    "--json", str(out)])
    printed = capsys.readouterr().out
    assert [(r["family"], r["cache"], r["alg"]) for r in rows] == [
        (f, c, a) for f in ("llada", "dream") for c in ("none", "prefix", "dual") for a in ("upstream", "KLASS")]
    for r in rows:
        assert r["forwards"] == 4 and r["batch"] == 2, r
        assert r["step_ms"] > 0 and r["forward_ms"] > 0 and r["sampler_ms"] >= 0, r
        assert r["syncs_per_forward"] is None  # counted on CUDA only
    assert printed.count("\n| tiny ") == len(rows) and "| model | batch | cache |" in printed
    assert json.loads(out.read_text()) == rows


def test_meta_build_is_a_working_model(gb, tmp_path):
    """Built on the meta device, moved with to_empty: nothing left on meta, Dream's rotary inv_freq computed again
    (after to_empty it would be uninitialised memory), finite logits."""
    from transformers import AutoConfig, AutoModel
    configs = gb._configs(tiny=True)
    for family in ("llada", "dream"):
        model, module, _ = gb.build(family, configs[family], None, torch.device("cpu"), torch.float32, 8.0,
                                    tmp_path / "built")
        tensors = list(model.parameters()) + list(model.buffers())
        assert all(t.device.type == "cpu" for t in tensors), family
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        assert bool(torch.isfinite(logits).all()), family
        assert (module is not None) == (family == "llada")
    folder = tmp_path / "built" / "gpu_bench_dream"
    plain = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    built = dict(model.named_buffers())
    assert any(name.endswith("inv_freq") for name in built)
    for name, buf in plain.named_buffers():
        assert torch.equal(built[name], buf), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_before_building(gb, monkeypatch):
    monkeypatch.setattr(gb, "build", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(SystemExit, match="CUDA is not available.*--device cpu --tiny"):
        gb.main([])


@pytest.mark.parametrize("args, match", [
    (["--device", "cpu", "--max-forwards", "1"], "--max-forwards must be at least 2"),
    (["--device", "cpu", "--batch", "0"], "--batch takes positive ints"),
    (["--device", "cpu", "--upstream", "/nonexistent/klass"], "--upstream must be a folder"),
    (["--device", "tpu"], "--device must be cuda"),
])
def test_bad_arguments(gb, monkeypatch, args, match):
    monkeypatch.setattr(gb, "build", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(SystemExit, match=match):
        gb.main(args)
