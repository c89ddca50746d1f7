"""Host reads per forward of each decoding loop: a CPU proxy for the device syncs a GPU run would make (issue 19).

    python bench/host_reads.py [--check] [--where] [--gen 64 --block 16 --batch 4]
    KLASS_PATCH_UPSTREAM=DIR [KLASS_PATCH_LLADA_MODEL=DIR] python bench/host_reads.py   # the real model code

A call that makes the host wait for the device drains a GPU's queue. While ``generate`` runs, a
``torch.overrides.TorchFunctionMode`` counts such calls: ``.item()``, ``.tolist()``, ``bool()`` / ``int()`` /
``float()`` / ``__index__`` of a tensor, ``nonzero``, ``argwhere``, one-argument ``where``, ``masked_select``,
``unique``, ``bincount``, ``equal``/``allclose``, ``repeat_interleave`` with tensor repeats, ``topk`` with a tensor
``k``, indexing or assigning with a boolean mask, ``.cpu()`` / ``.numpy()``, and a tensor built from Python data with
``device=`` (``torch.tensor``, ``as_tensor``). Reading a tensor that is on the host (what ``.cpu()`` returned, a
tensor built without ``device=``, and what is computed from them) is not counted (on a CPU ``.cpu()`` returns a copy
here, as it would on a GPU). ``.to(device)`` is not counted: on a CPU, ``.to(model.device)`` and ``.to("cpu")`` are
the same call.

The model's own reads are not the sampler's: from each model call's count, the count of a plain forward (upstream's
own uncached loop's model calls) is subtracted, down to 0 (a cached window forward may skip reads a plain forward
makes, such as the model's look at its attention mask; what a call reads beyond a plain forward, the cache's code
inside the model, is counted). Forwards are the model's calls (a forward pre-hook), so a cached step whose rows sit
in different phases (a full forward for some, a window for the others) counts two; the table also gives reads per
step (the loop's iterations: the most forwards a row made). ``--where`` also prints where the reads come from
(file:line of the first frame outside torch).

It is a proxy: on a CPU nothing waits, and on a GPU some of these calls read tensors that live on the host anyway;
what it shows is how many times a loop asks the device for a value before it can go on.

Setup as issue 19's table: tiny random models (2 layers, hidden 64, vocabulary 256 / 200) built from the real model
code when ``KLASS_PATCH_UPSTREAM`` is set (the layout of tests/conftest.py and bench/cache_bench.py), else from the CI
stand-ins (tests/standins); a batch of 4 rows with left padding (0, 2, 4, 6), 64 generated tokens, block 16,
``steps`` = 64, temperature 0. Limits (issue 19, item 3): KLASS without ``save_steps`` at most 1.0 per forward;
with ``save_steps`` one transfer per step more (2.0); upstream's algorithms under our cache at most upstream's own
uncached count plus 1 (all reads). The KLASS limits apply to klass-patch's own reads (the first frame outside torch
in the package, plus what a model call reads beyond a plain forward): upstream's ``diffusion_generate`` reads a few
values once per call before its loop, which KLASS cannot change. ``--check`` exits 1 if a run is over its limit.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

if "HF_MODULES_CACHE" not in os.environ:  # the model code is copied into a temporary modules cache, never the user's
    _hf = Path(tempfile.mkdtemp(prefix="klass-host-reads-")) / "hf"
    atexit.register(shutil.rmtree, _hf.parent, ignore_errors=True)
    os.environ.update(HF_HOME=str(_hf), HF_MODULES_CACHE=str(_hf / "modules"), HF_HUB_CACHE=str(_hf / "hub"))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

READS = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "__complex__", "nonzero", "argwhere",
         "masked_select", "unique", "unique_consecutive", "bincount", "equal", "allclose", "is_nonzero", "numpy",
         "__format__", "__repr__", "__contains__"}
TO_HOST = {"cpu", "numpy"}
KLASS = dict(alg="klass", conf_threshold=0.3, kl_threshold=0.05, kl_history_length=2)


def _masks(index):
    """The boolean tensors of an index (a tensor, or a tuple / list of them)."""
    if isinstance(index, torch.Tensor):
        return [index] if index.dtype in (torch.bool, torch.uint8) else []
    if isinstance(index, (tuple, list)):
        return [m for i in index for m in _masks(i)]
    return []


def _read(name, args, kwargs):
    """The tensors whose values the host needs for this call ([] if none: not a read), or None for a transfer
    from Python data (always counted)."""
    first = args[0] if args else None
    if name in READS or name == "cpu":
        return [first]
    if name in ("__getitem__", "__setitem__"):
        return _masks(args[1]) if len(args) > 1 else []
    if name == "where":
        return [first] if len(args) + len(kwargs) == 1 else []
    if name in ("tensor", "as_tensor"):
        return None if kwargs.get("device") is not None and not isinstance(first, torch.Tensor) else []
    if name == "repeat_interleave":
        reps = args[1] if len(args) > 1 else kwargs.get("repeats")
        return [reps] if isinstance(reps, torch.Tensor) and kwargs.get("output_size") is None else []
    if name in ("topk", "kthvalue"):
        k = args[1] if len(args) > 1 else kwargs.get("k")
        return [k] if isinstance(k, torch.Tensor) else []
    return []


class HostReads(TorchFunctionMode):
    """Counts the host reads of the torch calls made while active; ``inside`` counts those made inside the
    model's calls (set by :func:`counted`), ``ours`` those outside them made by klass_patch's code (the first frame
    outside torch is in the package), ``where`` their call sites when ``sites`` is True."""

    def __init__(self, sites=False):
        super().__init__()
        import klass_patch
        self.package = str(Path(klass_patch.__file__).resolve().parent) + os.sep
        self.total = self.inside = self.ours = 0
        self.depth = 0  # > 0 inside a model call
        self.calls = []  # reads inside each model call
        self.sites = sites
        self.where = collections.Counter()
        self.host = {}  # id -> weakref of the tensors on the host (.cpu() returned, or computed from such)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        read = _read(name, args, kwargs)
        counts = read is None or any(isinstance(t, torch.Tensor) and not self._on_host(t) for t in read)
        moved = name in TO_HOST or (name in ("tensor", "as_tensor") and kwargs.get("device") is None)
        # what is computed from a host tensor stays on the host (its .to(device) does not)
        stays = args and self._on_host(args[0]) and name not in ("to", "cuda")
        if (moved or stays) and isinstance(out, torch.Tensor):
            if moved and args and out is args[0]:  # a CPU tensor's .cpu() is itself: a copy, as a GPU's would be
                out = out.clone()
            self.host[id(out)] = weakref.ref(out)
        if counts:
            self.total += 1
            self.inside += self.depth > 0
            if self.depth == 0:
                site = _site()
                self.ours += str(Path(site[0]).resolve()).startswith(self.package)
                if self.sites:
                    self.where[f"{_short(site)} {name}"] += 1
        return out

    def _on_host(self, t):
        return isinstance(t, torch.Tensor) and id(t) in self.host and self.host[id(t)]() is t


def _site():
    """(file, line) of the first frame outside torch and this file."""
    f = sys._getframe(2)
    while f is not None and (f"{os.sep}torch{os.sep}" in f.f_code.co_filename or f.f_code.co_filename == __file__):
        f = f.f_back
    return ("?", 0) if f is None else (f.f_code.co_filename, f.f_lineno)


def _short(site):
    path = Path(site[0])
    try:
        path = path.relative_to(ROOT)
    except ValueError:
        pass
    return f"{path}:{site[1]}"


def counted(model, box):
    """Forward hooks: count the model's calls in ``box["forwards"]`` and tell the active ``box["mode"]`` when it is
    inside one."""

    def pre(module, args, kwargs):
        box["forwards"] += 1
        if box.get("mode") is not None:
            box["mode"].depth += 1
            box["mode"].calls.append(box["mode"].inside)

    def post(module, args, kwargs, out):
        if box.get("mode") is not None:
            box["mode"].depth -= 1
            box["mode"].calls[-1] = box["mode"].inside - box["mode"].calls[-1]

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


def _files(family):
    """(model files, sampler file) from $KLASS_PATCH_UPSTREAM (and KLASS_PATCH_LLADA_MODEL), else the stand-ins."""
    from conftest import STANDIN
    root = os.environ.get("KLASS_PATCH_UPSTREAM")
    if root:
        root = Path(root)
        if family == "llada":
            folder = Path(os.environ.get("KLASS_PATCH_LLADA_MODEL") or root / "llada-model")
            return [folder / "modeling_llada.py", folder / "configuration_llada.py"], \
                sorted((root / "llada").rglob("generate.py"))[-1]
        folder = root / "dream-model"
        return [folder / "modeling_dream.py", folder / "configuration_dream.py"], \
            sorted((root / "dream").rglob("generation_utils.py"))[-1]
    folder = ROOT / "tests" / "standins" / family
    files = [folder / f"modeling_{family}.py", folder / f"configuration_{family}.py"]
    return files, (STANDIN["llada"] if family == "llada" else folder / "generation_utils.py")


def build(family, tmp):
    """A tiny random model of ``family`` (bench/cache_bench.py's build with the test configs), and its sampler
    module (LLaDA) or None (Dream: the model's mixin)."""
    import json

    import klass_patch
    from compat_worker import DREAM_CONFIG, LLADA_CONFIG
    from conftest import load_file
    from transformers import AutoConfig, AutoModel
    klass_patch.apply()  # transformers 5.x: the model code needs the shims to load
    files, sampler = _files(family)
    folder = Path(tmp) / f"host_reads_{family}"
    folder.mkdir(parents=True)
    for f in files + ([sampler] if family == "dream" else []):
        shutil.copy(f, folder)
    config = dict(LLADA_CONFIG if family == "llada" else DREAM_CONFIG)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                    else torch.randn(p.shape, generator=g) * 3 / p.shape[-1] ** 0.5)
    model.eval()
    mask_id = config["mask_token_id"]

    def no_mask_token(module, args, out):  # as a trained model: [MASK] is never predicted
        out.logits[..., mask_id] = -1e4
    model.register_forward_hook(no_mask_token)
    module = None
    if family == "llada":
        module = load_file(sampler)
        klass_patch.apply(module)
    label = "real model code" if os.environ.get("KLASS_PATCH_UPSTREAM") else "stand-ins"
    return model, module, config, f"{family}: {label} ({Path(sampler).parent.name}/{Path(sampler).name})"


def runs(save_steps=True):
    """(family, label, kwargs, kind) per row; kind: 'upstream' (reference), 'klass', 'klass+save', 'cached'."""
    rows = [("llada", "LLaDA upstream loop", {}, "upstream")]
    for mode in (None, "prefix", "dual"):
        rows.append(("llada", f"LLaDA KLASS, {mode or 'no cache'}", dict(KLASS, use_cache=mode), "klass"))
    for mode in ("prefix", "dual"):
        rows.append(("llada", f"LLaDA upstream, {mode}", dict(use_cache=mode), "cached"))
    rows.append(("dream", "Dream upstream maskgit_plus", dict(alg="maskgit_plus"), "upstream"))
    for mode in (None, "prefix", "dual"):
        rows.append(("dream", f"Dream KLASS, {mode or 'no cache'}", dict(KLASS, use_cache=mode), "klass"))
    for mode in ("prefix", "dual"):
        rows.append(("dream", f"Dream upstream maskgit_plus, {mode}", dict(alg="maskgit_plus", use_cache=mode),
                     "cached"))
    if save_steps:
        for family, name in (("llada", "LLaDA"), ("dream", "Dream")):
            for mode in (None, "prefix", "dual"):
                rows.append((family, f"{name} KLASS + save_steps, {mode or 'no cache'}",
                             dict(KLASS, use_cache=mode, save_steps=True), "klass+save"))
    return rows


class Family:
    def __init__(self, family, tmp, a):
        self.family = family
        self.model, self.module, self.config, self.label = build(family, tmp)
        self.box = {"forwards": 0}
        counted(self.model, self.box)
        vocab = 190 if family == "dream" else 250
        pad = self.config["pad_token_id"]
        pads = [min(2 * r, a.prompt - 1) for r in range(a.batch)]
        self.ids = torch.randint(0, vocab - 6, (a.batch, a.prompt), generator=torch.Generator().manual_seed(1))
        self.mask = torch.ones_like(self.ids)
        for r, n in enumerate(pads):
            self.ids[r, :n], self.mask[r, :n] = pad, 0
        self.a = a

    def call(self, kw):
        a, kw = self.a, dict(kw)
        if self.family == "llada":
            return self.module.generate(self.model, self.ids, self.mask, steps=a.steps, gen_length=a.gen,
                                        block_length=a.block, mask_id=self.config["mask_token_id"],
                                        return_dict_in_generate=True, **kw)
        if kw.get("use_cache") is None:
            kw.pop("use_cache", None)
        else:
            kw["block_length"] = a.block
        return self.model.diffusion_generate(self.ids, attention_mask=self.mask, max_new_tokens=a.gen,
                                             steps=a.steps, temperature=0.0, return_dict_in_generate=True, **kw)

    def measure(self, kw, sites=False):
        """(forwards, steps, host reads in all, klass_patch's outside the model, reads inside each model call, call
        sites). Steps: the loop's
        iterations, the most forwards a row made (``used_steps``; upstream's own Dream output has none: its
        forwards)."""
        import klass_patch
        klass_patch.apply()
        if self.module is not None:
            klass_patch.apply(self.module)
        self.box["forwards"] = 0
        mode = HostReads(sites)
        self.box["mode"] = mode
        try:
            with torch.no_grad(), mode:
                out = self.call(kw)
        finally:
            self.box["mode"] = None
        used = getattr(out, "used_steps", None)
        steps = int(used.max()) if used is not None else self.box["forwards"]
        return self.box["forwards"], steps, mode.total, mode.ours, mode.calls, mode.where


def beyond_plain(calls, plain):
    """What the model calls read beyond a plain forward's ``plain`` reads each: the cache's code inside the model.
    A call that reads less (a window forward skips the model's look at its attention mask) counts 0, not less."""
    return sum(max(0, n - plain) for n in calls)


def table(a):
    """Measure every run; print the table; return the rows (dicts) and whether all are within their limits."""
    tmp = Path(tempfile.mkdtemp(prefix="klass-host-reads-models-"))
    families, plain, results = {}, {}, []
    try:
        for family, label, kw, kind in runs(not a.no_save_steps):
            if family not in a.family:
                continue
            if family not in families:
                families[family] = Family(family, tmp, a)
                print(f"# {families[family].label}")
            fam = families[family]
            forwards, steps, total, ours, calls, where = fam.measure(kw, a.where)
            if kind == "upstream":  # upstream's own loop: its model calls are plain forwards
                plain[family] = max(calls, default=0)
            extra = beyond_plain(calls, plain.get(family, 0))
            reads, ours = total - sum(calls) + extra, ours + extra
            results.append(dict(run=label, family=family, kind=kind, forwards=forwards, steps=steps, reads=reads,
                                per_forward=reads / forwards, per_step=reads / steps, ours=ours,
                                ours_per_forward=ours / forwards, inside=sum(calls), where=where))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results, print_table(results, plain, a)


LIMITS = {"klass": (1.0, "klass-patch's <= 1.0"), "klass+save": (2.0, "klass-patch's <= 2.0 (save_steps: +1 per step)")}


def print_table(results, plain, a):
    """Print the Markdown table, set each row's ``limit`` and ``pass``; True if every row passes. KLASS runs: the
    limit is on klass-patch's own reads (upstream's ``diffusion_generate`` reads a few values once per call before
    its loop); upstream's algorithms under the cache: on all reads, against upstream's own uncached loop."""
    reference = {r["family"]: r["per_forward"] for r in results if r["kind"] == "upstream"}
    ok = True
    print(f"batch {a.batch} (left padding), prompt {a.prompt}, gen {a.gen}, block {a.block}, steps {a.steps}; "
          "a plain forward's own reads (subtracted from each model call): "
          + ", ".join(f"{f} {v:.0f}" for f, v in plain.items()))
    print()
    print("| run | forwards | steps | host reads | per forward | per step | klass-patch's per forward | limit | |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in results:
        if r["kind"] == "cached":
            limit = reference.get(r["family"], 0.0) + 1.0
            limit, text, value = limit, f"<= {limit:.1f} (upstream + 1)", r["per_forward"]
        elif r["kind"] == "upstream":
            limit, text, value = None, "reference", None
        else:
            (limit, text), value = LIMITS[r["kind"]], r["ours_per_forward"]
        passed = limit is None or value <= limit + 1e-9
        ok &= passed
        r["limit"], r["pass"] = limit, passed
        print(f"| {r['run']} | {r['forwards']} | {r['steps']} | {r['reads']:.0f} | {r['per_forward']:.2f} | "
              f"{r['per_step']:.2f} | {r['ours_per_forward']:.2f} | {text} | "
              f"{'' if limit is None else 'pass' if passed else 'FAIL'} |")
        if a.where and r["where"]:
            for site, n in r["where"].most_common():
                print(f"|   {site} | | | {n} | | | | | |")
    return ok


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", nargs="+", default=["llada", "dream"], choices=["llada", "dream"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-save-steps", action="store_true", help="leave out the save_steps runs")
    ap.add_argument("--where", action="store_true", help="also print where the reads come from")
    ap.add_argument("--check", action="store_true", help="exit 1 if a run is over its limit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (counts do not depend on them)")
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    for name in ("batch", "prompt", "gen", "block", "steps"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name} must be a positive int, got {getattr(a, name)}")
    if a.gen % a.block or a.steps % (a.gen // a.block):
        raise SystemExit(f"--gen ({a.gen}) must be a multiple of --block ({a.block}), and --steps ({a.steps}) a "
                         f"multiple of the number of blocks")
    torch.set_grad_enabled(False)
    torch.set_num_threads(a.threads)
    _, ok = table(a)
    if a.check and not ok:
        print("host_reads: FAIL (a run is over its limit)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
