"""Per-step time and peak memory of KLASS vs upstream's default sampler, measured in one run.

    python bench/step_bench.py                      # both families, batch 1 and 8, on stand-ins
    KLASS_PATCH_UPSTREAM=DIR python bench/step_bench.py   # on the real upstream files (see README)

A stub model returns fixed random logits (a copy per forward, as a real model allocates its output) at
L = 128 + 256 and the real vocabulary sizes. Step time = wall time between forwards, averaged over
``--steps`` forwards after ``--warmup``. Peak memory is the peak RSS of a fresh process per run; the
extra memory of a sampler is its peak minus that of upstream's default run. "authors' layout" adds to
upstream's step the reference's dense state: float64 p_prev and p over the whole sequence and vocabulary,
and its KL, computed as the authors' sampler does at every step (their sampler itself is not shipped).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import klass_patch  # noqa: E402
from klass_patch.toy import dream_generation, llada_generate  # noqa: E402

VOCAB = {"llada": 126464, "dream": 152064}
MASK = {"llada": 126336, "dream": 151666}
PAPER = {"llada": dict(conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2),
         "dream": dict(conf_threshold=0.9, kl_threshold=0.001, kl_history_length=2)}


class Stop(Exception):
    pass


class StubModel:
    """Returns a copy of fixed logits; records when each forward starts; stops after ``limit`` forwards."""

    def __init__(self, family, rows, length, limit, dense=False):
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn((rows, length, VOCAB[family]), generator=g) * 4
        self.limit, self.stamps, self.dense = limit, [], dense
        self.device = torch.device("cpu")
        self.p_prev = None

    def __call__(self, x, *args, **kwargs):
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > self.limit:
            raise Stop
        out = self.logits[: x.shape[0]].clone()
        if self.dense:  # the authors' per-step state, over the whole sequence and vocabulary
            p = F.softmax(out.to(torch.float64), dim=-1)
            if self.p_prev is None:
                self.p_prev = torch.zeros_like(p)
            kl = (p * (torch.log(p + 1e-12) - torch.log(self.p_prev + 1e-12))).sum(-1)
            self.p_prev = p.clone()
            del kl
        return type("Out", (), {"logits": out})()


def _modules():
    root = os.environ.get("KLASS_PATCH_UPSTREAM")
    if not root:
        return llada_generate, dream_generation, "stand-ins"
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import load_file, real_files
    llada = load_file(real_files("llada")[-1])
    dream = load_file(real_files("dream")[-1])
    return llada, dream, f"upstream files in {root}"


def _model_config(family):
    """Upstream Dream builds its generation config from a transformers config; the stand-in needs none."""
    try:
        import transformers
        return transformers.PretrainedConfig(vocab_size=VOCAB[family], max_position_embeddings=4096)
    except ImportError:
        return None


def run(family, method, rows, limit, prompt_len=128, gen_length=256):
    """Run one sampler until the stub stops it; return the stub (with its timestamps)."""
    llada, dream, _ = _modules()
    klass_patch.apply(llada)
    klass_patch.apply(dream)
    length = prompt_len + gen_length
    model = StubModel(family, rows, length, limit, dense=(method == "authors"))
    prompt = torch.randint(0, 1000, (rows, prompt_len))
    extra = dict(alg="klass", **PAPER[family]) if method == "klass" else {}
    try:
        if family == "llada":
            llada.generate(model, prompt, steps=256, gen_length=gen_length, block_length=64, mask_id=MASK[family],
                           **extra)
        else:
            special = dict(mask_token_id=MASK[family], pad_token_id=151643, eos_token_id=151643, bos_token_id=151643)
            model = type("StubDream", (StubModel, dream.DreamGenerationMixin), {})(
                family, rows, length, limit, dense=(method == "authors"))
            model.config = _model_config(family)
            config = dream.DreamGenerationConfig(**special)
            model.diffusion_generate(prompt, generation_config=config, max_new_tokens=gen_length, steps=256,
                                     temperature=0.0, alg=extra.pop("alg", "maskgit_plus"), **extra)
    except Stop:
        pass
    return model


def step_seconds(stamps, warmup):
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def forward_seconds(family, rows, repeat=5):
    model = StubModel(family, rows, 384, 10 ** 9)
    x = torch.zeros((rows, 384), dtype=torch.long)
    model(x)
    t = time.perf_counter()
    for _ in range(repeat):
        model(x)
    return (time.perf_counter() - t) / repeat


def peak_extra_child(family, method, rows, limit):
    """Peak RSS (bytes) of a fresh process running one sampler."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import step_bench as b, resource; "
            f"b.run({family!r}, {method!r}, {rows}, {limit}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", nargs="+", default=["llada", "dream"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    limit = args.steps + args.warmup
    print(f"klass-patch step benchmark on {_modules()[2]}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, L = 128 + 256")
    results = {}
    for family in args.family:
        for rows in args.batch:
            fwd = forward_seconds(family, rows)
            up = step_seconds(run(family, "upstream", rows, limit).stamps, args.warmup)
            kl = step_seconds(run(family, "klass", rows, limit).stamps, args.warmup)
            results[(family, rows)] = dict(forward=fwd, upstream=up, klass=kl)
            print(f"{family:<6} batch {rows}: stub forward {fwd * 1e3:8.1f} ms | upstream step {up * 1e3:8.1f} ms | "
                  f"KLASS step {kl * 1e3:8.1f} ms | KLASS / upstream = {kl / up:.2f}")
        if 1 in args.batch and 8 in args.batch:
            r1, r8 = results[(family, 1)]["klass"], results[(family, 8)]["klass"]
            print(f"{family:<6} KLASS batch 8 step / batch 1 step = {r8 / r1:.2f} (target < 8)")
        if not args.no_memory:
            base = peak_extra_child(family, "upstream", 1, limit)
            ours = peak_extra_child(family, "klass", 1, limit) - base
            theirs = peak_extra_child(family, "authors", 1, limit) - base
            results[(family, "memory")] = dict(klass_extra=ours, authors_extra=theirs)
            print(f"{family:<6} batch 1 extra peak memory over upstream: KLASS {ours / 2**20:8.1f} MiB | "
                  f"authors' layout {theirs / 2**20:8.1f} MiB | ratio = {ours / theirs:.3f} (target <= 0.25)")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
