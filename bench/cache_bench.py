"""KV-cache benchmark (not a test): end-to-end generation time and tokens processed by the model per generated token,
no cache vs ``use_cache="prefix"`` vs ``"dual"``, KLASS vs upstream's default, on CPU-sized models built from the
real model code with the real vocabulary (random weights).

    KLASS_PATCH_UPSTREAM=/path/to/upstream python bench/cache_bench.py [--family llada dream] [--device cpu]

needs ``$KLASS_PATCH_UPSTREAM/dream-model/`` (modeling_dream.py, configuration_dream.py),
``$KLASS_PATCH_UPSTREAM/dream/<v>/generation_utils.py``, ``$KLASS_PATCH_UPSTREAM/llada/<v>/generate.py`` and LLaDA's
model code in ``$KLASS_PATCH_LLADA_MODEL`` (or ``$KLASS_PATCH_UPSTREAM/llada-model/``). Every configuration runs once,
in one process, one after the other; ratios are against no-cache KLASS (and no-cache upstream) of the same run.

The models have random weights, sharpened (``--sharpen``: the output layer scaled) so that tokens become confident
and KLASS unmasks several per step, as with trained weights; the number of forwards per block (what decides the
savings of a cache) is printed with each row. The weights, hence the texts, mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _hf_home():
    tmp = Path(tempfile.mkdtemp(prefix="klass-cache-bench-"))
    os.environ.update(HF_HOME=str(tmp / "hf"), HF_MODULES_CACHE=str(tmp / "hf" / "modules"),
                      HF_HUB_CACHE=str(tmp / "hf" / "hub"))
    return tmp


TMP = _hf_home()

LLADA = {  # LLaDA-8B's config.json, CPU-sized: real vocabulary, 4 layers, hidden 512
    "architectures": ["LLaDAModelLM"], "model_type": "llada",
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
    "block_group_size": 1, "block_type": "llama", "d_model": 512, "embedding_dropout": 0.0, "embedding_size": 126464,
    "vocab_size": 126464, "eos_token_id": 126081, "pad_token_id": 126081, "mask_token_id": 126336,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "max_sequence_length": 4096, "mlp_hidden_size": 1376, "mlp_ratio": 4,
    "multi_query_attention": None, "n_heads": 8, "n_kv_heads": 8, "n_layers": 4, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "float32", "use_cache": False, "weight_tying": False,
}
DREAM = {  # Dream-v0's config.json, CPU-sized: real vocabulary, 4 layers, hidden 512, GQA 8/2
    "architectures": ["DreamModel"], "model_type": "Dream",
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "vocab_size": 152064, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": False, "tie_word_embeddings": False,
    "rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096,
    "max_window_layers": 28, "attention_dropout": 0.0, "mask_token_id": 151666, "pad_token_id": 151643,
    "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "float32",
}


def build(family, files, config, sharpen):
    from transformers import AutoConfig, AutoModel
    folder = TMP / family
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        head = model.get_output_embeddings()
        head.weight.mul_(sharpen)
    return model.eval()


def upstream_dir():
    root = os.environ.get("KLASS_PATCH_UPSTREAM")
    if not root:
        sys.exit("set KLASS_PATCH_UPSTREAM (see the docstring)")
    return Path(root)


def counted(model):
    """A forward pre-hook counting the tokens each forward sends through the model."""
    box = {"tokens": 0, "forwards": 0}

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        box["tokens"] += ids.numel()
        box["forwards"] += 1

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return box


def run(label, fn, box, gen_tokens):
    box.update(tokens=0, forwards=0)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn()
    wall = time.perf_counter() - t
    return dict(label=label, wall=wall, tokens=box["tokens"], forwards=box["forwards"],
                per_token=box["tokens"] / gen_tokens, out=out)


def table(rows, base_klass, base_up, gen, blocks):
    print(f"{'configuration':34} {'wall s':>8} {'forwards':>9} {'fwd/block':>9} {'tokens/gen':>10} "
          f"{'tokens vs':>9} {'wall vs':>8}")
    for r in rows:
        base = base_klass if "KLASS" in r["label"] else base_up
        print(f"{r['label']:34} {r['wall']:8.1f} {r['forwards']:9d} {r['forwards'] / blocks:9.1f} "
              f"{r['per_token']:10.1f} {r['tokens'] / base['tokens']:9.3f} {r['wall'] / base['wall']:8.3f}")
    print("(tokens vs / wall vs: against the same algorithm without a cache, this run)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", nargs="+", default=["llada", "dream"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--sharpen", type=float, default=8.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--algs", nargs="+", default=["upstream", "klass"], help="which algorithms to run")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import klass_patch
    from conftest import load_file
    klass_patch.apply()
    up = upstream_dir()
    dtype = getattr(torch, a.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, {a.dtype}; "
          f"L = {a.prompt} + {a.gen}, block {a.block}, steps {a.steps}, sharpen {a.sharpen}")
    blocks = a.gen // a.block
    if "llada" in a.family:
        lm = Path(os.environ.get("KLASS_PATCH_LLADA_MODEL") or up / "llada-model")
        model = build("llada", [lm / "modeling_llada.py", lm / "configuration_llada.py"], LLADA, a.sharpen)
        model = model.to(a.device, dtype)
        gen_file = sorted((up / "llada").rglob("generate.py"))[-1]
        module = load_file(gen_file)
        klass_patch.apply(module)
        box = counted(model)
        prompt = torch.randint(0, 126000, (1, a.prompt), generator=torch.Generator().manual_seed(2)).to(a.device)
        common = dict(steps=a.steps, gen_length=a.gen, block_length=a.block, temperature=0.0, mask_id=126336,
                      return_dict_in_generate=True)
        klass = dict(alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2)
        print(f"\nLLaDA ({gen_file.parent.name} generate.py, modeling_llada.py), vocab 126464, 4 layers, hidden 512")
        rows = []
        algs = [(n, kw) for n, kw in (("upstream low_confidence", {}), ("KLASS", klass))
                if ("klass" if "KLASS" in n else "upstream") in a.algs]
        for uc in (None, "prefix", "dual"):
            for name, kw in algs:
                rows.append(run(f"{name}, cache {uc}", lambda: module.generate(model, prompt, use_cache=uc, **common,
                                                                            **kw), box, a.gen))
        base_up = next((r for r in rows if "upstream" in r["label"]), None)
        base_k = next((r for r in rows if "KLASS" in r["label"]), None)
        table(rows, base_k, base_up, a.gen, blocks)
        for r in rows:
            left = int((r["out"].sequences == 126336).sum())
            assert left == 0, (r["label"], left)
    if "dream" in a.family:
        dm = up / "dream-model"
        gu = sorted((up / "dream").rglob("generation_utils.py"))[-1]
        model = build("dream", [dm / "modeling_dream.py", dm / "configuration_dream.py", gu], DREAM, a.sharpen)
        model = model.to(a.device, dtype)
        box = counted(model)
        prompt = torch.randint(0, 150000, (1, a.prompt), generator=torch.Generator().manual_seed(2)).to(a.device)
        common = dict(max_new_tokens=a.gen, steps=a.steps, temperature=0.0, return_dict_in_generate=True)
        klass = dict(alg="klass", conf_threshold=0.9, kl_threshold=0.001, kl_history_length=2)
        print(f"\nDream ({gu.parent.name} generation_utils.py, modeling_dream.py), vocab 152064, 4 layers, hidden 512; "
              f"upstream maskgit_plus has no cache (no blocks)")
        rows = [run("upstream maskgit_plus, cache None",
                    lambda: model.diffusion_generate(prompt, alg="maskgit_plus", **common), box, a.gen)
                ] if "upstream" in a.algs else []
        for uc in (None, "prefix", "dual"):
            extra = dict(use_cache=uc, block_length=a.block) if uc else {}
            rows.append(run(f"KLASS, cache {uc}", lambda: model.diffusion_generate(prompt, **common, **klass, **extra),
                            box, a.gen))
        table(rows, next(r for r in rows if "KLASS" in r["label"]),
              next((r for r in rows if "upstream" in r["label"]), None), a.gen, blocks)


if __name__ == "__main__":
    main()
