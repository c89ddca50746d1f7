"""Per-step time and peak memory of KLASS vs upstream's default sampler, measured in one run.

    python bench/step_bench.py                      # both families, batch 1 and 8, on stand-ins
    python bench/step_bench.py --device cuda        # the same on a GPU
    KLASS_PATCH_UPSTREAM=DIR python bench/step_bench.py   # on the real upstream files (see README)
    python bench/step_bench.py --baseline DIR       # also klass-patch as it is in DIR, in the same run
    python bench/step_bench.py --threads 1          # one torch thread per run (a busy machine)

``--baseline DIR`` (a checkout of another commit, e.g. ``git worktree add --detach /tmp/base COMMIT``): every
round also runs upstream's and KLASS's steps with the ``klass_patch`` package of DIR (its stand-ins too), taking
turns with this tree's, and prints both trees' ratios and this tree's KLASS step over the baseline's, per round.

A stub model writes fixed random logits into its output buffer at every forward (as a model on a GPU
writes into the same cached block each time), at L = 128 + 256 and the real vocabulary sizes. The
rows of a batch are copies of the batch-1 input, so batch 8 has exactly 8 times batch 1's work.

- Step time: wall time between consecutive forwards (stub forward included), for ``--steps`` forwards
  after the first two, in runs that each have a fresh process; the median over all the timed steps of a
  configuration. There are ``--repeat`` rounds; in a round the configurations (stub forward, upstream,
  KLASS; batch 1, then 8, then 1 again) take turns, so that a shared machine's slow and fast spells fall
  on all of them alike.
- Ratios (KLASS / upstream, batch 8 / batch 1): per round, the ratio of the two configurations' median
  step times in that round (runs close in time); printed is the median over rounds, with each round's.
- Peak memory: peak RSS of the run's process (on a GPU: the peak of torch's allocations there); a
  sampler's extra memory is its peak minus that of upstream's default run. "authors' layout" adds to
  upstream's step the reference's dense state: float64 p_prev and p over the whole sequence and
  vocabulary, and its KL, computed as the authors' sampler does at every step (their sampler itself is
  not shipped).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# the klass_patch measured: this tree's, or a baseline's (set for the child processes by --baseline)
CODE = Path(os.environ.get("STEP_BENCH_CODE") or ROOT)
sys.path.insert(0, str(CODE))

import klass_patch  # noqa: E402
from klass_patch import cli  # noqa: E402
from klass_patch.toy import dream_generation, llada_generate  # noqa: E402

VOCAB = {"llada": 126464, "dream": 152064}
MASK = {"llada": 126336, "dream": 151666}
PAPER = cli.PAPER  # the authors' GSM8K settings


WARMUP = 2  # forwards not timed


class Stop(Exception):
    pass


def _sync(device):
    """Wait for the device's queued work, so that a timestamp covers it (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StubModel:
    """Returns a copy of fixed logits; records when each forward starts (after the device finished the
    previous step's work); stops after ``limit`` forwards."""

    def __init__(self, family, rows, length, limit, dense=False, device="cpu"):
        g = torch.Generator().manual_seed(0)
        self.device = torch.device(device)
        # every row is the same input, so that batch 8 does 8 times batch 1's work
        logits = torch.randn((1, length, VOCAB[family]), generator=g).mul_(4)
        self.logits = logits.to(self.device).repeat(rows, 1, 1)
        self.out = torch.empty_like(self.logits)
        self.limit, self.stamps, self.dense = limit, [], dense
        self.p_prev = None

    def __call__(self, x, *args, **kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > self.limit:
            raise Stop
        out = self.out[: x.shape[0]]
        out.copy_(self.logits[: x.shape[0]])
        if self.dense:  # the authors' per-step state, over the whole sequence and vocabulary
            p = F.softmax(out.to(torch.float64), dim=-1)
            if self.p_prev is None:
                self.p_prev = torch.zeros_like(p)
            self.kl = (p * (torch.log(p + 1e-12) - torch.log(self.p_prev + 1e-12))).sum(-1)
            self.p_prev = p.clone()
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


def run(family, method, rows, limit, device="cpu", prompt_len=128, gen_length=256):
    """Run one sampler until the stub stops it; return the stub (with its timestamps)."""
    llada, dream, _ = _modules()
    klass_patch.apply(llada)
    klass_patch.apply(dream)
    length = prompt_len + gen_length
    model = StubModel(family, rows, length, limit, dense=(method == "authors"), device=device)
    prompt = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(1)).repeat(rows, 1)
    prompt = prompt.to(model.device)
    extra = dict(alg="klass", **PAPER[family]) if method == "klass" else {}
    try:
        if family == "llada":
            llada.generate(model, prompt, steps=256, gen_length=gen_length, block_length=64, mask_id=MASK[family],
                           **extra)
        else:
            special = dict(mask_token_id=MASK[family], pad_token_id=151643, eos_token_id=151643, bos_token_id=151643)
            model = type("StubDream", (StubModel, dream.DreamGenerationMixin), {})(
                family, rows, length, limit, dense=(method == "authors"), device=device)
            model.config = _model_config(family)
            config = dream.DreamGenerationConfig(**special)
            model.diffusion_generate(prompt, generation_config=config, max_new_tokens=gen_length, steps=256,
                                     temperature=0.0, alg=extra.pop("alg", "maskgit_plus"), **extra)
    except Stop:
        pass
    return model


def step_gaps(stamps, warmup):
    """Times between consecutive forwards after ``warmup``."""
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def forward_seconds(family, rows, device="cpu", repeat=5):
    """Times of ``repeat`` stub forwards after a first one."""
    model = StubModel(family, rows, 384, 10 ** 9, device=device)
    x = torch.zeros((rows, 384), dtype=torch.long, device=model.device)
    for _ in range(repeat + 1):
        model(x)
    _sync(model.device)
    return step_gaps(model.stamps + [time.perf_counter()], 1)


def peak_memory(device):
    """Peak memory of this process so far: RSS on a CPU, torch's allocations on a GPU (bytes)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(family, what, rows, limit, device, code=None):
    """Run one measurement in a fresh process (memory freed between runs; the peak is this run's alone), with
    the ``klass_patch`` of ``code`` (a checkout; None: this tree). Returns (the seconds of each timed step, or of
    each stub forward for ``what == "forward"``; peak memory in bytes)."""
    script = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import step_bench as b; "
              "import os, torch; torch.set_grad_enabled(False); "
              "os.environ.get('STEP_BENCH_THREADS') and torch.set_num_threads(int(os.environ['STEP_BENCH_THREADS'])); "
              f"t = b.forward_seconds({family!r}, {rows}, {device!r}) if {what!r} == 'forward' else "
              f"b.step_gaps(b.run({family!r}, {what!r}, {rows}, {limit}, {device!r}).stamps, {WARMUP}); "
              f"print(json.dumps([t, b.peak_memory({device!r}), b.klass_patch.__file__]))")
    env = dict(os.environ, STEP_BENCH_CODE=str(code or ROOT))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{family} {what} batch {rows} failed:\n{out.stderr[-2000:]}")
    times, peak, used = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(used).resolve().parents[1] != Path(code or ROOT).resolve():
        raise RuntimeError(f"the child measured {used}, not the klass_patch of {code or ROOT}")
    return times, peak


WHAT = ("forward", "upstream", "klass")


def measure(family, batches, limit, repeat, device, baseline=None):
    """``repeat`` rounds. In a round every configuration runs once, taking turns, batch by batch, and the
    first batch runs again at the end, so that the batch-1 runs of a round bracket its batch-8 runs in
    time. With a ``baseline`` checkout, its upstream and KLASS runs (configurations ``(what, rows, "baseline")``)
    take turns with this tree's. Returns the rounds (per configuration, the timed steps of its runs in that
    round) and the smallest peak memory per configuration."""
    def configs(rows):
        return [(what, rows) for what in WHAT] + ([(what, rows, "baseline") for what in WHAT[1:]] if baseline else [])
    order = [c for rows in batches for c in configs(rows)]
    if len(batches) > 1:
        order += configs(batches[0])
    rounds, peaks = [], {}
    for _ in range(max(1, repeat)):
        times = {}
        for config in order:
            t, peak = child(family, config[0], config[1], limit, device, baseline if len(config) > 2 else None)
            times.setdefault(config, []).extend(t)
            peaks.setdefault(config, []).append(peak)
        rounds.append(times)
    return rounds, {c: min(v) for c, v in peaks.items()}


def ratio(rounds, top, bottom):
    """Median step time of ``top`` over that of ``bottom`` in each round; their median, and the list."""
    each = [statistics.median(r[top]) / statistics.median(r[bottom]) for r in rounds]
    return statistics.median(each), each


def _spread(each):
    return ", ".join(f"{x:.2f}" for x in each)


def _device_name(device):
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def report_baseline(family, rounds, batches, results):
    """The baseline's step times and ratio, and this tree's KLASS step over the baseline's (per round)."""
    for rows in batches:
        up, kl = (statistics.median([t for r in rounds for t in r[(what, rows, "baseline")]]) for what in WHAT[1:])
        mid, each = ratio(rounds, ("klass", rows, "baseline"), ("upstream", rows, "baseline"))
        ours, ours_each = ratio(rounds, ("klass", rows), ("upstream", rows))
        vs, vs_each = ratio(rounds, ("klass", rows), ("klass", rows, "baseline"))
        results[(family, f"baseline {rows}")] = dict(upstream=up, klass=kl, klass_over_upstream=each,
                                                      klass_over_baseline_klass=vs_each)
        print(f"{family:<6} batch {rows}: baseline upstream step {up * 1e3:8.1f} ms | KLASS step {kl * 1e3:8.1f} ms | "
              f"KLASS / upstream = {mid:.2f} (rounds: {_spread(each)})")
        print(f"{family:<6} batch {rows}: KLASS / upstream, this tree {ours:.2f} vs baseline {mid:.2f}; this tree's "
              f"KLASS step / the baseline's = {vs:.2f} (rounds: {_spread(vs_each)})")


def _baseline_dir(path):
    if path is None:
        return None
    path = Path(path).resolve()
    if not (path / "klass_patch" / "__init__.py").is_file():
        raise SystemExit(f"--baseline must be a checkout holding klass_patch/ (e.g. git worktree add --detach "
                         f"/tmp/base COMMIT), got {path}")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", nargs="+", default=["llada", "dream"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds; in each, every configuration runs once (batch 1 twice), taking turns")
    parser.add_argument("--device", default="cpu", help="where the stub model and the samplers run (cpu, cuda)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--baseline", help="a checkout of another commit: its klass_patch measured in the same run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every run (0: torch's default); "
                                                               "on a busy machine 1 keeps threads from waiting on "
                                                               "each other")
    args = parser.parse_args()
    baseline = _baseline_dir(args.baseline)
    if args.threads < 0:
        raise SystemExit(f"--threads must be 0 (torch's default) or a positive int, got {args.threads}")
    if args.threads:
        os.environ["STEP_BENCH_THREADS"] = str(args.threads)  # the child processes read it
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    limit = args.steps + WARMUP
    print(f"klass-patch step benchmark on {_modules()[2]}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {_device_name(args.device)}, L = 128 + 256; klass_patch of "
          f"{ROOT}" + (f", baseline: the klass_patch of {baseline}" if baseline else ""))
    results = {}
    for family in args.family:
        rounds, peaks = measure(family, args.batch, limit, args.repeat, args.device, baseline)
        for rows in args.batch:
            fwd, up, kl = (statistics.median([t for r in rounds for t in r[(what, rows)]]) for what in WHAT)
            mid, each = ratio(rounds, ("klass", rows), ("upstream", rows))
            results[(family, rows)] = dict(forward=fwd, upstream=up, klass=kl, klass_over_upstream=each,
                                           upstream_peak=peaks[("upstream", rows)], klass_peak=peaks[("klass", rows)])
            print(f"{family:<6} batch {rows}: stub forward {fwd * 1e3:8.1f} ms | upstream step {up * 1e3:8.1f} ms | "
                  f"KLASS step {kl * 1e3:8.1f} ms | KLASS / upstream = {mid:.2f} (rounds: {_spread(each)}; "
                  "target <= 1 at batch 1)")
        if 1 in args.batch and 8 in args.batch:
            line = []
            for what in WHAT:
                mid, each = ratio(rounds, (what, 8), (what, 1))
                results[(family, f"{what} batch 8 / 1")] = each
                line.append(f"{mid:.2f} (rounds: {_spread(each)})")
            print(f"{family:<6} batch 8 step / batch 1 step: KLASS {line[2]} (target < 8); upstream {line[1]}; "
                  f"stub forward {line[0]}")
        if baseline:
            report_baseline(family, rounds, args.batch, results)
        if not args.no_memory and 1 in args.batch:
            base = results[(family, 1)]["upstream_peak"]
            ours = results[(family, 1)]["klass_peak"] - base
            theirs = child(family, "authors", 1, limit, args.device)[1] - base
            results[(family, "memory")] = dict(klass_extra=ours, authors_extra=theirs)
            print(f"{family:<6} batch 1 extra peak memory over upstream: KLASS {ours / 2**20:8.1f} MiB | "
                  f"authors' layout {theirs / 2**20:8.1f} MiB | ratio = {ours / theirs:.3f} (target <= 0.25)")
    if args.json:
        part = Path(args.json).with_name(Path(args.json).name + ".part")
        part.write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=1))
        os.replace(part, args.json)


if __name__ == "__main__":
    main()
