"""GPU benchmark (issue 19, item 6): per-step time of upstream's sampler and KLASS, with no cache, ``"prefix"`` and
``"dual"``, on LLaDA-8B-Instruct's and Dream-v0-Instruct-7B's real configurations with random bf16 weights, and the
host syncs of each run.

    python bench/gpu_bench.py --upstream DIR                     # one GPU, a few minutes; prints a Markdown table
    python bench/gpu_bench.py --upstream DIR --family llada --batch 8 --json out.json
    python bench/gpu_bench.py --device cpu --tiny                # smoke test on a CPU (tiny configs and sizes)

``--upstream DIR``: the real model and sampler code, laid out as for the tests (``KLASS_PATCH_UPSTREAM``, see the
README's "Testing against the real upstream files")::

    DIR/llada/<any name>/generate.py            # LLaDA's sampler (the last one found is used)
    DIR/llada-model/modeling_llada.py           # LLaDA's model code (or KLASS_PATCH_LLADA_MODEL=<folder>)
    DIR/llada-model/configuration_llada.py
    DIR/dream/<any name>/generation_utils.py    # Dream's sampler
    DIR/dream-model/modeling_dream.py           # Dream's model code
    DIR/dream-model/configuration_dream.py

A machine without network access needs this folder carried to it (it holds only code: no weights are read; the
weights are random). Without ``--upstream``, the CI stand-ins of the model code (tests/standins) are used, which are
not upstream's model: fine for ``--tiny``, not for numbers.

What it does, per family: the model is built from the real configuration (the values are written below, with
where they come from) on the meta device, moved to the GPU with ``to_empty`` and given random weights there
(normal, std 1/sqrt(fan-in); norms 1; the output layer scaled by ``--sharpen`` so that some tokens are confident,
as with trained weights); buffers computed at construction (Dream's rotary ``inv_freq``) are computed again on the
device. Prompt 128 random tokens, 256 generated, block 32, 256 steps, batch 1 and 8, temperature 0. For every
(batch, algorithm, cache) a run is stopped after ``--max-forwards`` forwards (the whole generation if it ends
first). KLASS uses the authors' GSM8K settings (``klass_patch.cli.PAPER``).

- Step time: CUDA events recorded at the start of every forward (a forward pre-hook): the median time from one
  forward's start to the next one's, after ``--warmup`` forwards. Forward time: from its start to its end (a
  forward hook); sampler time: from a forward's end to the next one's start (what the decoding loop costs, host
  waits included).
- Host syncs: a second, shorter run (``--sync-forwards`` forwards) under ``torch.cuda.set_sync_debug_mode("warn")``
  counts the warnings torch gives for each synchronising call, outside the model's forwards and inside them.

On a CPU (``--device cpu``) times come from ``time.perf_counter`` and syncs are not counted (bench/host_reads.py
has a CPU proxy).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "HF_MODULES_CACHE" not in os.environ:  # the model code is copied into a temporary modules cache, never the user's
    _hf = Path(tempfile.mkdtemp(prefix="klass-gpu-bench-")) / "hf"
    os.environ.update(HF_HOME=str(_hf), HF_MODULES_CACHE=str(_hf / "modules"), HF_HUB_CACHE=str(_hf / "hub"))

import torch  # noqa: E402

# GSAI-ML/LLaDA-8B-Instruct's config.json (public copy: yinj66/support_basis, LLaDA-8B-Instruct-B&S-light/config.json
# at 66e6761ac3; the same sizes as bench/cache_bench.py's CPU-sized copy, which keeps everything but d_model,
# n_layers, n_heads and mlp_hidden_size)
LLADA_8B = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada",
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
    "block_group_size": 1, "block_type": "llama", "d_model": 4096, "embedding_dropout": 0.0, "embedding_size": 126464,
    "eos_token_id": 126081, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": 126336,
    "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4, "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}
# Dream-org/Dream-v0-Instruct-7B's config.json (public copy, byte-identical to the hub's files per
# ../shared/UPSTREAM.md: monash-yann/dllm-research, models/Dream-7B-Instruct/config.json at db7170277f)
DREAM_7B = {
    "architectures": ["DreamModel"], "model_type": "Dream",
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666,
    "max_position_embeddings": 131072, "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "pad_token_id": 151643, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
    "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064,
}
FULL = dict(prompt=128, gen=256, block=32, steps=256, batch=[1, 8])
TINY = dict(prompt=8, gen=16, block=8, steps=16, batch=[1, 2])
CACHES = (None, "prefix", "dual")


class Stop(Exception):
    pass


def _configs(tiny):
    if not tiny:
        return {"llada": dict(LLADA_8B), "dream": dict(DREAM_7B)}
    sys.path.insert(0, str(ROOT / "tests"))
    from compat_worker import DREAM_CONFIG, LLADA_CONFIG  # the tests' tiny configs (same fields)
    return {"llada": dict(LLADA_CONFIG), "dream": dict(DREAM_CONFIG)}


def _files(family, upstream):
    """(model files, sampler file) of ``family`` from ``upstream`` (None: the stand-ins)."""
    if upstream is None:
        folder = ROOT / "tests" / "standins" / family
        sampler = ROOT / "klass_patch" / "toy" / "llada_generate.py" if family == "llada" else \
            folder / "generation_utils.py"
        return [folder / f"modeling_{family}.py", folder / f"configuration_{family}.py"], sampler
    up = Path(upstream)
    if family == "llada":
        folder = Path(os.environ.get("KLASS_PATCH_LLADA_MODEL") or up / "llada-model")
        samplers = sorted((up / "llada").rglob("generate.py"))
    else:
        folder = up / "dream-model"
        samplers = sorted((up / "dream").rglob("generation_utils.py"))
    files = [folder / f"modeling_{family}.py", folder / f"configuration_{family}.py"]
    missing = [str(f) for f in files if not f.is_file()] + ([] if samplers else [f"{up}/{family}/*/ sampler"])
    if missing:
        raise SystemExit(f"--upstream {up}: missing {', '.join(missing)} (see the docstring for the layout)")
    return files, samplers[-1]


def _rope_buffers(model, device):
    """Buffers a rotary embedding computed at construction (meta there): computed again on ``device``."""
    for m in model.modules():
        if "inv_freq" not in m._buffers:
            continue
        if hasattr(m, "rope_init_fn") and hasattr(m, "config"):
            inv_freq, _ = m.rope_init_fn(m.config, device, **getattr(m, "rope_kwargs", {}))
        else:
            dim = 2 * m.inv_freq.numel()
            base = getattr(m, "base", None) or m.config.rope_theta
            inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim)
        m.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if hasattr(m, "original_inv_freq"):
            m.original_inv_freq = m.inv_freq


@torch.no_grad()
def _init(model, sharpen, seed=0):
    """Random weights on their device: normal with std 1/sqrt(fan-in), norms 1, the output layer times sharpen."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
    model.get_output_embeddings().weight.mul_(sharpen)


def build(family, config, upstream, device, dtype, sharpen, tmp):
    """A model of ``family`` with ``config`` built from the model code, random weights, on ``device``; and its
    sampler module (LLaDA) or None (Dream: the model's own mixin)."""
    import klass_patch
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import load_file
    klass_patch.apply()  # transformers 5.x: the model code needs the shims to load
    files, sampler = _files(family, upstream)
    folder = Path(tmp) / f"gpu_bench_{family}"
    folder.mkdir(parents=True)
    for f in files + ([sampler] if family == "dream" else []):
        shutil.copy(f, folder)
    (folder / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    cls = get_class_from_dynamic_module(config["auto_map"]["AutoModel"], str(folder))
    with torch.device("meta"):
        if family == "llada":  # LLaDAModelLM builds its model on the CPU: built here on the meta device instead
            code = sys.modules[cls.__module__]
            inner = code.create_model_config_from_pretrained_config(cfg)
            inner.init_device = "meta"
            model = cls(cfg, model=code.LLaDAModel(inner, init_params=False))
        else:
            model = cls(cfg)
    model = model.to(dtype).to_empty(device=device)
    _rope_buffers(model, device)
    _init(model, sharpen)
    model.eval()
    module = None
    if family == "llada":
        module = load_file(sampler)
        klass_patch.apply(module)
    return model, module, f"{family}: {Path(sampler).parent.name}/{Path(sampler).name}, {files[0].name}"


class Clock:
    """Timestamps of forward starts and ends: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.starts, self.ends = [], []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def start(self):
        self.starts.append(self._now())

    def end(self):
        self.ends.append(self._now())

    def _ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def times(self, warmup):
        """(step, forward, sampler) times in ms, medians over the forwards after ``warmup``."""
        if self.cuda:
            torch.cuda.synchronize()
        s, e = self.starts, self.ends
        step = [self._ms(a, b) for a, b in zip(s[warmup:], s[warmup + 1:])]
        fwd = [self._ms(a, b) for a, b in zip(s[warmup:], e[warmup:])]
        gap = [self._ms(a, b) for a, b in zip(e[warmup:], s[warmup + 1:])]
        med = (lambda v: statistics.median(v) if v else float("nan"))
        return med(step), med(fwd), med(gap)


class Hooks:
    """Forward hooks: count forwards, stop after ``limit``, feed a Clock, and note which warnings fall inside the
    forwards (``spans``: the ``caught`` indices at each forward's start and end)."""

    def __init__(self, model):
        self.limit, self.forwards, self.clock, self.caught, self.spans = None, 0, None, None, []
        model.register_forward_pre_hook(self.pre, with_kwargs=True)
        model.register_forward_hook(self.post, with_kwargs=True)

    def pre(self, module, args, kwargs):
        if self.limit is not None and self.forwards >= self.limit:
            raise Stop
        self.forwards += 1
        if self.caught is not None:
            self.spans.append([len(self.caught), None])
        if self.clock is not None:
            self.clock.start()

    def post(self, module, args, kwargs, out):
        if self.clock is not None:
            self.clock.end()
        if self.caught is not None:
            self.spans[-1][1] = len(self.caught)


def is_sync(w):
    """Whether a caught warning is set_sync_debug_mode's ("called a synchronizing CUDA operation")."""
    return "synchroniz" in str(w.message)


def count_syncs(caught, spans):
    """(sync warnings outside the forwards, inside them)."""
    inside = sum(is_sync(w) for a, b in spans for w in caught[a:b if b is not None else len(caught)])
    return sum(is_sync(w) for w in caught) - inside, inside


def generate(family, model, module, ids, kw, sizes):
    if family == "llada":
        return module.generate(model, ids, steps=sizes["steps"], gen_length=sizes["gen"],
                               block_length=sizes["block"], mask_id=model.config.mask_token_id, **kw)
    kw = dict(kw)
    if kw.get("use_cache") is None:
        kw.pop("use_cache", None)
    else:
        kw["block_length"] = sizes["block"]
    return model.diffusion_generate(ids, max_new_tokens=sizes["gen"], steps=sizes["steps"], temperature=0.0, **kw)


def run(family, model, module, hooks, ids, kw, sizes, limit, clock=None, caught=None):
    """One generation, stopped after ``limit`` forwards; returns the number of forwards made."""
    hooks.limit, hooks.forwards, hooks.clock, hooks.caught, hooks.spans = limit, 0, clock, caught, []
    try:
        with torch.no_grad():
            generate(family, model, module, ids, kw, sizes)
    except Stop:
        pass
    finally:
        hooks.limit = hooks.clock = hooks.caught = None
    return hooks.forwards


@contextlib.contextmanager
def sync_warnings(device):
    """The warnings torch gives for synchronising calls (``set_sync_debug_mode("warn")``), in a list."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)


def measure(family, model, module, hooks, a, sizes, device, paper):
    """Rows of the table for one family: every batch, algorithm and cache."""
    rows = []
    c = model.config  # prompt tokens below every special id
    top = min(i for i in (c.vocab_size, c.mask_token_id, c.eos_token_id, c.pad_token_id) if i is not None)
    upstream_alg = {} if family == "llada" else dict(alg="maskgit_plus")
    for batch in sizes["batch"]:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, top, (batch, sizes["prompt"]), generator=g).to(device)
        run(family, model, module, hooks, ids, upstream_alg, sizes, a.warmup + 2)  # warm the kernels
        for cache in CACHES:
            for alg, kw in (("upstream", upstream_alg), ("KLASS", dict(alg="klass", **paper))):
                kw = dict(kw, use_cache=cache)
                clock = Clock(device)
                forwards = run(family, model, module, hooks, ids, kw, sizes, a.max_forwards, clock)
                step, fwd, gap = clock.times(a.warmup)
                syncs = inside = None
                if device.type == "cuda":
                    with sync_warnings(device) as caught:
                        n = run(family, model, module, hooks, ids, kw, sizes, a.sync_forwards, caught=caught)
                    syncs, inside = (c / n for c in count_syncs(caught, hooks.spans))
                rows.append(dict(family=family, batch=batch, alg=alg, cache=cache or "none", forwards=forwards,
                                 step_ms=step, forward_ms=fwd, sampler_ms=gap, syncs_per_forward=syncs,
                                 model_syncs_per_forward=inside))
                print(f"  {family} batch {batch} {alg:8} cache {cache or 'none':6}: {forwards} forwards, "
                      f"step {step:.2f} ms", file=sys.stderr)
    return rows


def table(rows):
    """A Markdown table of the rows (KLASS's step over upstream's with the same batch and cache)."""
    out = ["| model | batch | cache | algorithm | forwards | step ms | forward ms | sampler ms | KLASS / upstream "
           "(step) | host syncs per forward (sampler; model) |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: "
           "| ---: | --- |"]
    ref = {(r["family"], r["batch"], r["cache"]): r["step_ms"] for r in rows if r["alg"] == "upstream"}
    for r in rows:
        rel = r["step_ms"] / ref[(r["family"], r["batch"], r["cache"])] if r["alg"] == "KLASS" else None
        syncs = "n/a (CPU)" if r["syncs_per_forward"] is None else \
            f"{r['syncs_per_forward']:.1f}; {r['model_syncs_per_forward']:.1f}"
        out.append(f"| {r['model']} | {r['batch']} | {r['cache']} | {r['alg']} | {r['forwards']} | {r['step_ms']:.2f} "
                   f"| {r['forward_ms']:.2f} | {r['sampler_ms']:.2f} | {'' if rel is None else f'{rel:.2f}'} "
                   f"| {syncs} |")
    return "\n".join(out)


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", help="folder with the real model and sampler code (see the docstring)")
    ap.add_argument("--family", nargs="+", default=["llada", "dream"], choices=["llada", "dream"])
    ap.add_argument("--batch", nargs="+", type=int, help="batch sizes (default 1 8; --tiny: 1 2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs and sizes: a smoke test")
    ap.add_argument("--max-forwards", type=int, default=96, help="forwards per timed run")
    ap.add_argument("--sync-forwards", type=int, default=16, help="forwards per sync-counting run")
    ap.add_argument("--warmup", type=int, default=2, help="forwards of a run not timed")
    ap.add_argument("--sharpen", type=float, default=8.0, help="scale of the output layer")
    ap.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default)")
    ap.add_argument("--json", help="also write the rows here")
    return ap


def check(a):
    """Errors before anything is built: CUDA, sizes."""
    try:
        device = torch.device(a.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise SystemExit(f"gpu_bench: --device must be cuda[:N] or cpu, got {a.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_bench: --device {a.device} but CUDA is not available (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda}); on a CPU run the smoke test: --device cpu --tiny")
    for name in ("max_forwards", "sync_forwards"):
        if getattr(a, name) < 2:
            raise SystemExit(f"gpu_bench: --{name.replace('_', '-')} must be at least 2, got {getattr(a, name)}")
    if a.warmup < 0 or a.warmup + 2 > a.max_forwards:
        raise SystemExit(f"gpu_bench: --warmup must be in [0, --max-forwards - 2], got {a.warmup}")
    if a.batch is not None and any(b < 1 for b in a.batch):
        raise SystemExit(f"gpu_bench: --batch takes positive ints, got {a.batch}")
    if a.upstream is not None and not Path(a.upstream).is_dir():
        raise SystemExit(f"gpu_bench: --upstream must be a folder, got {a.upstream}")
    return device


def main(argv=None):
    a = parser().parse_args(argv)
    device = check(a)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from klass_patch import cli
    sizes = dict(TINY if a.tiny else FULL)
    if a.batch:
        sizes["batch"] = a.batch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = _configs(a.tiny)
    name = {"llada": "LLaDA-8B-Instruct", "dream": "Dream-v0-Instruct-7B"}
    tmp = Path(tempfile.mkdtemp(prefix="klass-gpu-bench-models-"))
    rows, started = [], time.perf_counter()
    try:
        for family in a.family:
            model, module, label = build(family, configs[family], a.upstream, device, dtype, a.sharpen, tmp)
            hooks = Hooks(model)
            print(f"# {label}", file=sys.stderr)
            for r in measure(family, model, module, hooks, a, sizes, device, cli.PAPER[family]):
                r["model"] = ("tiny " if a.tiny else "") + name[family]
                rows.append(r)
            del model, hooks
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {dtype}; prompt {sizes['prompt']}, gen {sizes['gen']}, block "
          f"{sizes['block']}, steps {sizes['steps']}; {a.max_forwards} forwards per run at most (the first "
          f"{a.warmup} not timed); random weights (output layer x{a.sharpen}); {time.perf_counter() - started:.0f} s\n")
    print(table(rows))
    if a.json:
        part = Path(a.json).with_name(Path(a.json).name + ".part")
        part.write_text(json.dumps(rows, indent=1))
        os.replace(part, a.json)
    return rows


if __name__ == "__main__":
    main()
