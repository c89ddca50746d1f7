"""lm-eval's command line passes ``device='cuda:0'`` when no ``--device`` was given: ``klass-patch lm-eval`` on a
machine without CUDA says nothing about a device nobody asked for, and still warns when one was asked for."""
import logging

import pytest

from fixtures.eval import toys

WARNING = "asked for but CUDA is not available"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed: pip install -e '.[lm-eval]'")
    return toys.model_folder(tmp_path_factory.mktemp("device") / "toy_llada", "llada")


def build(monkeypatch, caplog, folder, *extra):
    """``klass_patch.lm_eval.main`` up to the model: lm-eval parses the arguments into its run config, then a
    stand-in ``simple_evaluate`` builds the ``klass`` model as lm-eval's does (no task, no evaluation)."""
    import lm_eval
    import torch
    from lm_eval.api.registry import get_model
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from klass_patch.lm_eval import main

    built = []

    def simple_evaluate(model, model_args, batch_size=None, max_batch_size=None, device=None, **_):
        extra = {"batch_size": batch_size, "max_batch_size": max_batch_size, "device": device}
        make = get_model(model).create_from_arg_obj if isinstance(model_args, dict) else \
            get_model(model).create_from_arg_string
        built.append(make(model_args, extra))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    # lm-eval's index of its ~10k task files takes half a minute; the stand-in does not use it
    monkeypatch.setattr(EvaluatorConfig, "process_tasks", lambda self, metadata=None: None)
    caplog.set_level(logging.INFO, logger="klass_patch.lm_eval")
    assert main(["--model", "klass", "--model_args", f"pretrained={folder}", "--tasks", "none", *extra]) == 0
    [lm] = built
    return lm


def test_no_device_asked_no_cuda_warning(monkeypatch, caplog, folder):
    lm = build(monkeypatch, caplog, folder)
    assert lm.device.type == "cpu"
    assert WARNING not in caplog.text


@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--device=cuda:0"], ["--dev", "cuda:0"]])
def test_cuda_asked_without_cuda_warns(monkeypatch, caplog, folder, extra):
    lm = build(monkeypatch, caplog, folder, *extra)
    assert lm.device.type == "cpu"
    assert WARNING in caplog.text


def test_cuda_in_config_file_warns(monkeypatch, caplog, folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("device: cuda:0\n")
    lm = build(monkeypatch, caplog, folder, "--config", str(config))
    assert lm.device.type == "cpu"
    assert WARNING in caplog.text


def test_cpu_asked_runs_on_cpu_quietly(monkeypatch, caplog, folder):
    lm = build(monkeypatch, caplog, folder, "--device", "cpu")
    assert lm.device.type == "cpu"
    assert WARNING not in caplog.text
