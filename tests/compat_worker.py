"""The subprocess side of tests/test_compat.py, run by a python with transformers 4.x or 5.x and torch, with the
repository on PYTHONPATH. Each command writes what it computed to OUT with torch.save, for a bitwise comparison.

    compat_worker.py build  DIR DREAM_FILES... [--llada LLADA_FILES...]  # tiny Dream/LLaDA folders (random weights)
    compat_worker.py run    DIR OUT [--apply] [--llada-generate FILE]    # logits, generations, RNG state
    compat_worker.py native OUT [--apply]                                # a native tiny Llama
    compat_worker.py revert DIR OUT                  # apply(), load, revert(): still runs? revert(compat=True): identity?
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers

DREAM_CONFIG = {
    "architectures": ["DreamModel"], "model_type": "Dream",
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "vocab_size": 200, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 512, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "use_cache": False, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
    "attention_dropout": 0.0, "mask_token_id": 199, "pad_token_id": 198, "bos_token_id": 197, "eos_token_id": 198,
    "torch_dtype": "float32",
}
# as Dream-v0-*-7B's generation_config.json: special ids, no sampling parameters
DREAM_GENERATION_CONFIG = {"bos_token_id": 197, "eos_token_id": 198, "pad_token_id": 198}
LLADA_CONFIG = {  # LLaDA-8B's config.json, tiny
    "architectures": ["LLaDAModelLM"], "model_type": "llada",
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
    "block_group_size": 1, "block_type": "llama", "d_model": 64, "embedding_dropout": 0.0, "embedding_size": 256,
    "vocab_size": 256, "eos_token_id": 250, "pad_token_id": 250, "mask_token_id": 255, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "max_sequence_length": 512, "mlp_hidden_size": 128, "mlp_ratio": 4,
    "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "float32", "use_cache": False,
    "weight_tying": False,
}
DREAM_KLASS = dict(alg="klass", conf_threshold=0.9, kl_threshold=0.001)
LLADA_KLASS = dict(alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2)


def _load(folder):
    from transformers import AutoModel
    return AutoModel.from_pretrained(folder, trust_remote_code=True).eval()


def _plain(out):
    """Tensors, lists and dicts of them: a generation output without its class (which differs by version)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (list, tuple)):
        return [_plain(x) for x in out]
    if isinstance(out, dict) or hasattr(out, "__dataclass_fields__"):
        items = out.items() if isinstance(out, dict) else vars(out).items()
        return {k: _plain(v) for k, v in items if v is not None}
    return out


def _generation_config(model):
    return {k: v for k, v in model.generation_config.to_dict().items()
            if not k.startswith("_") and k != "transformers_version"}


def _saved_and_reloaded(model, source, ids):
    """save_pretrained, then from_pretrained again: the generation config and logits it comes back with. (The
    files themselves differ: 5.x writes the values that differ from ITS defaults, e.g. "max_length": 20.)"""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        for name in os.listdir(source):  # the code (4.46.2 does not save it)
            if name.endswith(".py") and not os.path.exists(os.path.join(folder, name)):
                shutil.copy(os.path.join(source, name), folder)
        model = _load(folder)
    with torch.no_grad():
        return {"generation_config": _generation_config(model), "logits": model(ids).logits}


def build(a):
    assert transformers.__version__.startswith("4."), transformers.__version__
    from transformers import AutoConfig, AutoModel
    for family, files, config, generation_config in (("dream", a.dream_files, DREAM_CONFIG, DREAM_GENERATION_CONFIG),
                                                     ("llada", a.llada, LLADA_CONFIG, None)):
        if not files:
            continue
        folder = os.path.join(a.dir, family)
        os.makedirs(folder)
        for f in files:
            shutil.copy(f, folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        torch.manual_seed(0)
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                      trust_remote_code=True)
        if family == "llada":  # LLaDA never initialises its weights itself: seeded draws, non-degenerate logits
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for _, p in sorted(model.named_parameters()):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                            else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        model.save_pretrained(folder, safe_serialization=True)
        if generation_config is not None:
            with open(os.path.join(folder, "generation_config.json"), "w") as f:
                json.dump(generation_config, f)


def _dream(folder, R):
    torch.manual_seed(99)
    model = _load(folder)
    R["dream/rng_after_load"] = torch.rand(4)
    R["dream/inv_freq"] = model.model.rotary_emb.inv_freq.clone()
    R["dream/generation_config"] = _generation_config(model)
    ids = torch.randint(0, 190, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        R["dream/logits"] = model(ids).logits
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 198, 0  # left padding
    common = dict(attention_mask=mask, max_new_tokens=16, steps=16, return_dict_in_generate=True, output_history=True)

    def gen(seed=None, **kw):
        if seed is not None:
            torch.manual_seed(seed)
        return _plain(model.diffusion_generate(ids, **common, **kw))
    R["dream/maskgit_plus_greedy"] = gen(alg="maskgit_plus", temperature=0.0)
    for alg in ("topk_margin", "entropy"):  # every upstream alg
        R[f"dream/{alg}_greedy"] = gen(alg=alg, temperature=0.0)
    R["dream/origin_t0.2"] = gen(4321, alg="origin", temperature=0.2)
    R["dream/maskgit_plus_no_temperature"] = gen(1234, alg="maskgit_plus")  # 4.x's legacy defaults (D5)
    R["dream/klass_greedy"] = gen(temperature=0.0, **DREAM_KLASS)
    R["dream/klass_t0.2_p0.95"] = gen(1234, temperature=0.2, top_p=0.95, **DREAM_KLASS)
    R["dream/saved_and_reloaded"] = _saved_and_reloaded(model, folder, ids)


def _llada(folder, generate_file, R):
    spec = importlib.util.spec_from_file_location("llada_generate_under_test", generate_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(99)
    model = _load(folder)
    R["llada/rng_after_load"] = torch.rand(4)
    ids = torch.randint(0, 240, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, n in ((1, 3), (2, 6)):  # left padding
        ids[row, :n], mask[row, :n] = 250, 0
    with torch.no_grad():
        R["llada/logits"] = model(ids).logits
        R["llada/logits_masked"] = model(ids, attention_mask=mask).logits
    common = dict(steps=16, gen_length=16, block_length=8, mask_id=255)
    R["llada/default"] = module.generate(model, ids, mask, **common)
    torch.manual_seed(4321)
    R["llada/random"] = module.generate(model, ids, mask, remasking="random", **common)
    R["llada/klass"] = _plain(module.generate(model, ids, mask, return_dict_in_generate=True, **common, **LLADA_KLASS))
    torch.manual_seed(4321)
    R["llada/klass_t0.7"] = module.generate(model, ids, mask, temperature=0.7, **common, **LLADA_KLASS)


def run(a):
    if a.apply:
        import klass_patch
        klass_patch.apply()
    R = {}
    if os.path.isdir(os.path.join(a.dir, "dream")):
        _dream(os.path.join(a.dir, "dream"), R)
    if os.path.isdir(os.path.join(a.dir, "llada")) and a.llada_generate:
        _llada(os.path.join(a.dir, "llada"), a.llada_generate, R)
    R["rng_state_after"] = torch.get_rng_state()
    torch.save(R, a.out)


def native(a):
    """A native tiny Llama, built and saved, then loaded: what apply() must leave alone."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    if a.apply:
        import klass_patch
        klass_patch.apply()
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    R = {}
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    R["init_state"] = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        torch.manual_seed(99)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        R["rng_after_load"] = torch.rand(4)
    R["loaded_state"] = {k: v.clone() for k, v in model.state_dict().items()}
    R["buffers"] = {k: v.clone() for k, v in model.named_buffers()}
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        R["logits"] = model(ids).logits
    R["greedy"] = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.manual_seed(7)
    R["sampled"] = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=0)
    R["rng_state_after"] = torch.get_rng_state()
    torch.save(R, a.out)


def _snapshot(modules):
    """Every attribute of the modules and of the classes they define, by identity."""
    out = {}
    for module in modules:
        for name, value in vars(module).items():
            out[(module.__name__, name)] = value
            if isinstance(value, type) and value.__module__ == module.__name__:
                out.update({(module.__name__, name, attr): v for attr, v in vars(value).items()})
    return out


def _dream_call(model, **kwargs):
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.diffusion_generate(ids, max_new_tokens=4, steps=4, temperature=0.0, return_dict_in_generate=True,
                                   **kwargs)
    return out.sequences.tolist()


def _error(function):
    try:
        function()
    except Exception as exc:  # noqa: BLE001 (what the user would see)
        return f"{type(exc).__name__}: {exc}"
    return None


def revert(a):
    """Import the remote code (without building a model), apply(), load and run, then:

    - revert(): the models loaded still compute the same (Dream's maskgit_plus too; its alg="klass" is gone), and a
      copy of each folder (new remote-code modules) still loads and computes the same;
    - revert(compat=True): every attribute of the remote-code modules, their classes and the source loader is the
      object it was before apply()."""
    import importlib.machinery
    import warnings
    import klass_patch
    from klass_patch import compat
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    families = [f for f in ("dream", "llada") if os.path.isdir(os.path.join(a.dir, f))]
    for family in families:
        folder = os.path.join(a.dir, family)
        for reference in AutoConfig.from_pretrained(folder, trust_remote_code=True).auto_map.values():
            get_class_from_dynamic_module(reference, folder)
    modules = [m for name, m in sys.modules.items() if name.startswith("transformers_modules.") and
               any(n in vars(m) for n in compat._CLASS_NAMES)]
    loader = importlib.machinery.SourceFileLoader
    before, before_loader = _snapshot(modules), dict(vars(loader))
    klass_patch.apply()
    shimmed = compat.applied()
    attributes = {attr for _, _, records in compat._applied.values() for _, attr, _ in records}
    ran, models, dream_before = {}, {}, None

    def logits_sum(model):
        with torch.no_grad():
            return float(model(torch.tensor([[5, 6, 7, 8]])).logits.sum())
    for family in families:
        models[family] = _load(os.path.join(a.dir, family))
        ran[family] = logits_sum(models[family])
    if "dream" in models:
        dream_before = _dream_call(models["dream"], alg="maskgit_plus")

    kept = {"returned": klass_patch.revert(), "applied_after": compat.applied() == shimmed and bool(shimmed)}
    for family, model in models.items():
        kept[f"{family}/same_logits"] = logits_sum(model) == ran[family]
        with tempfile.TemporaryDirectory() as parent:  # a new module name: imported through the import hook
            copy = os.path.join(parent, f"{family}_loaded_after_revert")
            shutil.copytree(os.path.join(a.dir, family), copy)
            kept[f"{family}/new_load_same_logits"] = logits_sum(_load(copy)) == ran[family]
    if "dream" in models:
        kept["dream/maskgit_plus"] = _dream_call(models["dream"], alg="maskgit_plus") == dream_before
        kept["dream/klass_error"] = _error(lambda: _dream_call(models["dream"], alg="klass"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        removed = klass_patch.revert(compat=True)
    after = _snapshot(modules)
    # every attribute as it was; of those added since (Hugging Face adds some while loading: _auto_class, ...),
    # none is one that a shim set
    changed = sorted(".".join(k) for k in before.keys() | after.keys() if before.get(k, "absent") is not
                     after.get(k, "absent") and (k in before or k[-1] in attributes))
    broken = {}
    if "dream" in models:
        broken["dream/maskgit_plus"] = _error(lambda: _dream_call(models["dream"], alg="maskgit_plus"))
    with open(a.out, "w") as f:
        json.dump({"modules": [m.__name__ for m in modules], "shimmed": shimmed, "ran": ran, "kept": kept,
                   "removed": sorted(removed), "warned": [str(w.message) for w in caught
                                                          if issubclass(w.category, RuntimeWarning)],
                   "broken": broken, "changed": changed, "loader_restored": dict(vars(loader)) == before_loader,
                   "applied_after": compat.applied()}, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build")
    p.add_argument("dir")
    p.add_argument("dream_files", nargs="*")
    p.add_argument("--llada", nargs="*", default=[])
    p = commands.add_parser("run")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--apply", action="store_true")
    p.add_argument("--llada-generate")
    p = commands.add_parser("native")
    p.add_argument("out")
    p.add_argument("--apply", action="store_true")
    p = commands.add_parser("revert")
    p.add_argument("dir")
    p.add_argument("out")
    args = parser.parse_args()
    {"build": build, "run": run, "native": native, "revert": revert}[args.command](args)
