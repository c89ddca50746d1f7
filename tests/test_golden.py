"""Every golden trace of the authors' samplers, replayed through the patched upstream interface."""
import pytest
import torch

import klass_patch
from compare import assert_steps_match
from conftest import installed_copy, load_file, needs_transformers, sources
from replay import DEVICE, DREAM_SPECIAL, ReplayModel, dream_kwargs, dream_replay_class, load, reference_steps, traces


def run_llada(module, trace):
    model = ReplayModel(trace)
    out = module.generate(
        model, trace["prompt"].to(DEVICE), steps=trace["steps"], gen_length=trace["gen_length"],
        block_length=trace["block_length"], temperature=trace["temperature"], mask_id=trace["mask_id"],
        alg="klass", conf_threshold=trace["conf_threshold"], kl_threshold=trace["kl_threshold"],
        kl_history_length=trace["kl_history_length"], unmask_strategy=trace["unmask_strategy"],
        save_steps=True, return_dict_in_generate=True)
    return model, out


def run_dream(module, trace):
    cls = dream_replay_class(module.DreamGenerationMixin, module.DreamGenerationConfig(**DREAM_SPECIAL))
    model = cls(trace)
    torch.manual_seed(trace["seed"])
    kwargs = dream_kwargs(trace)
    config = module.DreamGenerationConfig(**DREAM_SPECIAL)
    return model, model.diffusion_generate(trace["prompt"].to(DEVICE), generation_config=config, **kwargs)


def check(model, out, trace):
    assert torch.equal(out.sequences.cpu(), trace["output"])
    assert model.calls == len(trace["xs"])
    assert out.used_steps.tolist() == [len(trace["xs"])]
    assert_steps_match(out.history, reference_steps(trace), trace)


@pytest.fixture(scope="module", params=sources("llada"))
def llada_file(request):
    return request.param


@pytest.fixture(scope="module", params=["apply(module)", "installed file"])
def llada_module(request, llada_file, tmp_path_factory):
    if request.param == "installed file":  # rewritten by the installer; no runtime apply()
        return load_file(installed_copy(llada_file, "llada", tmp_path_factory.mktemp("llada"))), False
    return load_file(llada_file), True


@pytest.mark.parametrize("name", traces("llada"))
def test_llada_trace(llada_module, name):
    llada_module, needs_apply = llada_module
    if needs_apply:
        klass_patch.apply(llada_module)
    trace = load(name)
    left = int((trace["output"] == trace["mask_id"]).sum())
    if left:
        with pytest.warns(RuntimeWarning, match=f"{left} masked position"):
            model, out = run_llada(llada_module, trace)
    else:
        model, out = run_llada(llada_module, trace)
    check(model, out, trace)


@pytest.mark.parametrize("path", sources("dream"))
@pytest.mark.parametrize("how", ["apply(module)", "apply() then import", "installed file"])
def test_dream_traces(path, how, tmp_path):
    needs_transformers(path)
    if how == "apply(module)":
        module = load_file(path)
        klass_patch.apply(module)
    elif how == "installed file":  # rewritten by the installer; no runtime apply()
        module = load_file(installed_copy(path, "dream", tmp_path))
        assert [(i.module, i.family, i.version.endswith("(installed file)")) for i in klass_patch.patched()] == \
            [(module.__name__, "dream", True)]  # listed (issue 18, item 12e)
    else:
        klass_patch.apply()
        module = load_file(path)  # patched by the import hook
    import warnings
    for name in traces("dream"):
        trace = load(name)
        if DEVICE.type != "cpu" and trace["temperature"] > 0:
            continue  # its draws came from the CPU's random stream
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model, out = run_dream(module, trace)
        check(model, out, trace)
