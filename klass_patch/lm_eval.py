"""KLASS (and upstream's samplers) as an lm-evaluation-harness model: ``--model klass``.

    klass-patch lm-eval --model klass --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,llada_generate=generate.py \\
        --tasks gsm8k --batch_size 8 --output_path out          # also: python -m klass_patch.lm_eval ...
    accelerate launch -m klass_patch.lm_eval --model klass --model_args pretrained=... --tasks gsm8k   # N GPUs

lm-eval 0.4.13 has ``register_model`` but does not discover plugins: this module registers ``KlassLM`` as
``klass`` when imported, and ``main()`` then runs lm-eval's own command line (same arguments). Newer
lm-eval versions read the ``lm_eval.models`` entry point ``klass = klass_patch.lm_eval:KlassLM``.

``model_args`` (unset: the authors' values, as ``klass-patch eval``; the KLASS thresholds default to their
GSM8K ones): ``pretrained`` (folder or hub id), ``family`` (llada|dream, default from the config), ``alg``
(klass; LLaDA default|random; Dream maskgit_plus|origin|topk_margin|entropy), ``conf_threshold``,
``kl_threshold``, ``kl_history_length``, ``unmask_strategy``, ``steps``, ``gen_length``, ``block_length``,
``temperature``, ``top_p``, ``dtype`` (auto|bfloat16|float16|float32), ``llada_generate`` (path of LLaDA's
``generate.py``; default ./generate.py, else klass-patch's stand-in), ``save_steps`` (a folder: one step
log per request), ``mask_id``, ``seed``, ``use_cache`` (prefix|dual), ``cache_refresh_every``; for
``loglikelihood``: ``mc_num`` (Monte Carlo samples, default 128), ``mc_batch_size`` (default 32),
``check_greedy`` (default true: whether greedy decoding of the masked continuation writes it, lm-eval's
``is_greedy``, which lambada's ``acc`` and multiple-choice ``exact_match`` read; false skips it, with a
warning, and those metrics read 0), ``max_length`` (default 4096: a longer context + continuation loses
context tokens from the left, with a warning, as lm-eval's HFLM).
``--batch_size N`` batches ``generate_until`` (left padding with an attention mask) where sampling draws no
random numbers; ``--device`` as usual (one device per process under ``accelerate launch``; not given: CUDA
where available, else cpu).

The task's ``until`` strings cut the decoded text; its ``max_gen_toks``, ``temperature`` and ``do_sample``
are not used (a diffusion model writes ``gen_length`` positions; sampling is set in ``model_args``).
Forwards: every ``generate_until`` request's model forwards (``used_steps``) are counted; the average per
request, per task and overall, over every process, goes into the results file as ``config.klass`` (lm-eval's
``get_model_info`` hook) and, when run through this module's ``main()``, as a ``forwards`` row of each
task's metrics (printed in lm-eval's table), and is logged.
"""
from __future__ import annotations

import logging
import os
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

log = logging.getLogger("klass_patch.lm_eval")

NAME = "klass"
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # what lm-eval's command line passes when no --device is given
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
LOGLIKELIHOOD_TASKS = ("multiple-choice and loglikelihood tasks: arc_easy, arc_challenge, hellaswag, mmlu, piqa, "
                       "winogrande, lambada, ...")
ROLLING_TASKS = "perplexity tasks (loglikelihood_rolling): wikitext, pile_*, lambada's perplexity metric, ..."


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in TRUE + FALSE:
        raise ValueError(f"{name} must be one of {', '.join(TRUE + FALSE)}, got {value!r}")
    return word in TRUE


def _int(value, name: str, least: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < least or str(number) != str(value).strip():
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return number


def _opt(value, kind):
    """A model_arg: lm-eval passes numbers already parsed, or strings; ``None``/``""`` means unset."""
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "none"):
        return None
    return kind(value)


class KlassLM(LM):
    """An ``lm_eval.api.model.LM`` running LLaDA (through its patched ``generate.py``) or Dream (through the
    model's patched ``diffusion_generate``) with KLASS or upstream's samplers."""

    def __init__(self, pretrained: str = None, family: Optional[str] = None, alg: str = "klass",
                 conf_threshold=None, kl_threshold=None, kl_history_length=None, unmask_strategy=None, steps=None,
                 gen_length=None, block_length=None, temperature=None, top_p=None, dtype: str = "auto",
                 llada_generate: Optional[str] = None, save_steps: Optional[str] = None, mask_id=None, seed=0,
                 batch_size=1, max_batch_size=None, device: Optional[str] = None, mc_num=128, mc_batch_size=32,
                 check_greedy=True, max_length=4096, use_cache=None, cache_refresh_every=None, **unused):
        super().__init__()
        from .evaluation import Generator
        from .evaluation.loading import load_llada_generate, load_model, resolve_device_dtype

        if not pretrained:
            raise ValueError("model_args needs pretrained=<model folder or hub id>")
        if unused:
            log.warning("klass: model_args not used: %s", ", ".join(sorted(unused)))
        given = dict(alg=alg or "klass", conf_threshold=_opt(conf_threshold, float),
                     kl_threshold=_opt(kl_threshold, float), kl_history_length=_opt(kl_history_length, int),
                     unmask_strategy=_opt(unmask_strategy, str), steps=_opt(steps, int),
                     gen_length=_opt(gen_length, int), block_length=_opt(block_length, int),
                     temperature=_opt(temperature, float), top_p=_opt(top_p, float), mask_id=_opt(mask_id, int),
                     seed=_opt(seed, int), save_steps=bool(_opt(save_steps, str)),
                     use_cache=_opt(use_cache, str), cache_refresh_every=_opt(cache_refresh_every, int))
        self._read_settings(pretrained, family, batch_size, given)
        self.steps_dir = Path(save_steps) if _opt(save_steps, str) else None
        self._read_loglikelihood_args(mc_num, mc_batch_size, check_greedy, max_length)
        device, torch_dtype = resolve_device_dtype(self._pick_device(device), dtype or "auto")
        self._device = torch.device(device)
        generate_fn = None
        if self.family == "llada":
            generate_fn, self.generate_source = load_llada_generate(_opt(llada_generate, str), log=log.info)
        self.model, self.tokenizer = load_model(pretrained, device, torch_dtype)
        self.pretrained = pretrained
        self.generator = Generator(self.model, self.settings, generate_fn, self.tokenizer)
        s = self.settings = self.generator.settings  # LLaDA: mask_id from the config, else the tokenizer's
        self.mask_token = s.mask_id if s.mask_id is not None else self._mask_id()
        self.rows = self.generator.rows
        self.forwards = defaultdict(list)  # task -> used steps of each of this process's requests
        self.forwards_total = None  # {task: (sum, count)} over every process, after generate_until
        log.info("klass: %s (%s) on %s, %s", pretrained, self.family, device, s.label())

    def _read_settings(self, pretrained, family, batch_size, given: dict) -> None:
        from .evaluation.loading import detect_family
        from .evaluation.settings import resolve_settings

        self.batch_size_arg = batch_size
        batch = str(batch_size)
        if batch.startswith("auto"):
            log.warning("klass: batch_size %s: no automatic batch size for diffusion sampling; using 1", batch)
            batch = "1"
        self.family = detect_family(pretrained, _opt(family, str))
        # the KLASS thresholds default to the authors' GSM8K values (the table's first column)
        self.settings = resolve_settings(self.family, "gsm8k", batch_size=int(batch), **given)

    def _read_loglikelihood_args(self, mc_num, mc_batch_size, check_greedy, max_length) -> None:
        """``loglikelihood``'s model_args, checked before the model is loaded."""
        self.mc_num, self.mc_batch_size = _int(mc_num, "mc_num", 1), _int(mc_batch_size, "mc_batch_size", 1)
        if self.mc_num % self.mc_batch_size:
            raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of mc_batch_size ({mc_batch_size})")
        self.check_greedy = _bool(check_greedy, "check_greedy")
        self.max_length = _int(max_length, "max_length (tokens of context + continuation)", 2)
        self._greedy_warned = False

    def _pick_device(self, device: Optional[str]) -> Optional[str]:
        """The device asked for (``None``: CUDA where available, else cpu); under ``accelerate launch`` with
        several processes, this process's."""
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: requests sharded by lm-eval
            import accelerate

            on_cpu = not torch.cuda.is_available() or str(device or "").startswith("cpu")
            accelerator = accelerate.Accelerator(cpu=on_cpu)  # cpu=True: gloo across CPU processes
            if accelerator.num_processes > 1:
                self.accelerator = accelerator
                self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
                return str(accelerator.device)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("klass: device %s asked for but CUDA is not available; using cpu", device)
            return "cpu"
        return device

    # -- lm-eval's distributed primitives (HFLM's, with the global process index) --------------------------
    @property
    def device(self):
        return self._device

    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # -- chat templates (--apply_chat_template) ---------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.pretrained)).replace("/", "__")

    def chat_template(self, chat_template=False):
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- generate_until ---------------------------------------------------------------------------------------
    def _seed(self, instance, copy: int) -> int:
        """Each request's own torch seed (model_args seed, task, document, repeat): the text does not depend
        on the batch, the order or the number of processes."""
        key = f"{getattr(instance, 'task_name', '')}/{getattr(instance, 'doc_id', 0)}/{copy}".encode()
        return (self.settings.seed + zlib.crc32(key)) % (2 ** 63)

    def _text(self, ids: torch.Tensor, until: List[str]) -> str:
        ids = ids.tolist()
        stops = {i for i in (self.tokenizer.eos_token_id, self.mask_token) if i is not None}
        for i, t in enumerate(ids):
            if t in stops:
                ids = ids[:i]
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from tqdm import tqdm

        from .evaluation import encode, split_history

        seen = defaultdict(int)  # copies of one Instance: its repeats, then lm-eval's padding of a rank
        work = []
        for n, instance in enumerate(requests):
            copy = seen[id(instance)]
            seen[id(instance)] += 1
            padding = copy >= max(1, getattr(instance, "repeats", 1))
            work.append((n, instance, copy, padding))
        # longest prompts first (similar lengths batch together), then back in the requests' order
        work.sort(key=lambda w: -len(w[1].args[0]))
        out: List[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="klass generate_until", disable=disable_tqdm or self.rank != 0)
        for start in range(0, len(work), self.rows):
            chunk = work[start:start + self.rows]
            prompts = [w[1].args[0] for w in chunk]
            ids, mask = encode(self.tokenizer, prompts, self.family, self.device)
            torch.manual_seed(self._seed(chunk[0][1], chunk[0][2]))  # one row where sampling is random
            sequences, used, history = self.generator(ids, mask)
            for row, (n, instance, copy, padding) in enumerate(chunk):
                kwargs = instance.args[1] if len(instance.args) > 1 and isinstance(instance.args[1], dict) else {}
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out[n] = self._text(sequences[row, ids.shape[1]:].cpu(), until)
                if not padding:
                    self.forwards[getattr(instance, "task_name", None) or "?"].append(int(used[row]))
                if history is not None and self.steps_dir is not None and not padding:
                    from . import write_steps_jsonl

                    name = f"{getattr(instance, 'task_name', 'task')}/{getattr(instance, 'doc_id', n)}"
                    name += f"_{copy}.jsonl" if copy else ".jsonl"
                    (self.steps_dir / name).parent.mkdir(parents=True, exist_ok=True)
                    write_steps_jsonl(split_history(history, row, len(chunk)), self.steps_dir / name)
            bar.update(len(chunk))
        bar.close()
        self._gather_forwards()
        return out

    def _gather_forwards(self) -> None:
        """The forwards of every process (all ranks call generate_until together, as lm-eval pads them)."""
        mine = {task: (sum(v), len(v)) for task, v in self.forwards.items()}
        if self.accelerator is not None:
            every = [None] * self.world_size
            torch.distributed.all_gather_object(every, mine)
        else:
            every = [mine]
        total = defaultdict(lambda: [0, 0])
        for part in every:
            for task, (steps, n) in part.items():
                total[task][0] += steps
                total[task][1] += n
        self.forwards_total = {task: tuple(v) for task, v in total.items()}
        report = self.forwards_report()
        if self.rank == 0 and report["requests"]:
            log.info("klass: average forwards per request %.2f (%d requests; gen_length %d, steps %d)",
                     report["average_forwards"], report["requests"], self.settings.gen_length,
                     self.settings.steps)
            print(f"klass: average forwards per request {report['average_forwards']:.2f} over "
                  f"{report['requests']} requests (gen_length {self.settings.gen_length}, steps "
                  f"{self.settings.steps}); per task: "
                  + ", ".join(f"{t} {v['average_forwards']:.2f}" for t, v in report["per_task"].items()))

    def forwards_report(self) -> dict:
        total = self.forwards_total
        if total is None:
            total = {task: (sum(v), len(v)) for task, v in self.forwards.items()}
        steps, n = sum(v[0] for v in total.values()), sum(v[1] for v in total.values())
        return {"average_forwards": round(steps / n, 4) if n else None, "requests": n,
                "per_task": {t: {"average_forwards": round(v[0] / v[1], 4), "requests": v[1]}
                             for t, v in sorted(total.items()) if v[1]}}

    def get_model_info(self) -> dict:
        """Added by lm-eval to the results' ``config`` (rank 0, after the evaluation)."""
        return {"klass": dict(self.forwards_report(), family=self.family, pretrained=self.pretrained,
                              settings={k: v for k, v in self.settings.to_dict().items()
                                        if k not in ("dataset", "timeout")},
                              world_size=self.world_size)}

    # -- loglikelihood: the Monte Carlo estimator of LLaDA's eval_llada.py -------------------------------------
    def _pair(self, context: str, continuation: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the context and continuation; trailing spaces of the context move to the continuation
        (as lm-eval's TemplateLM)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        special = self.family == "llada"
        whole = self.tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
        head = self.tokenizer(context, add_special_tokens=special)["input_ids"]
        if not head:  # a bidirectional denoiser still wants something to condition on
            bos = self.tokenizer.bos_token_id
            bos = bos if bos is not None else self.tokenizer.eos_token_id
            head, whole = [bos], [bos] + list(whole)
        return torch.tensor(head), torch.tensor(whole[len(head):])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).logits
        if self.family == "dream":  # Dream predicts position i + 1 at position i
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits.float()

    @torch.no_grad()
    def _mc_loglikelihood(self, prefix: torch.Tensor, target: torch.Tensor) -> float:
        """log p(target | prefix) >= E_t [ (1/t) sum over masked target tokens of log p(token | noisy) ],
        estimated over ``mc_num`` draws: each draw masks ``k`` of the ``L`` target tokens (uniformly chosen
        positions) and weighs the cross entropy by ``L / k``; the ``k`` of a mini batch are spread evenly
        over 1..L from a random start (stratified, as LLaDA's eval_llada.py)."""
        length, rows = len(target), self.mc_batch_size
        seq = torch.cat([prefix, target]).to(self.device).unsqueeze(0).expand(rows, -1)
        total = 0.0
        for _ in range(self.mc_num // self.mc_batch_size):
            start = int(torch.randint(1, length + 1, ()))
            k = torch.tensor([(round(start + i * length / rows) - 1) % length + 1 for i in range(rows)],
                             device=self.device)
            order = torch.stack([torch.randperm(length, device=self.device) for _ in range(rows)])
            masked = order < k.unsqueeze(1)  # k random target positions per row
            masked = torch.cat([torch.zeros(rows, len(prefix), dtype=torch.bool, device=self.device), masked], 1)
            noisy = torch.where(masked, torch.full_like(seq, self.mask_token), seq)
            logits = self._logits(noisy)
            weight = (length / k.float()).unsqueeze(1).expand(-1, seq.shape[1])
            loss = F.cross_entropy(logits[masked], seq[masked], reduction="none") * weight[masked]
            total += float(loss.sum()) / rows
        return -total / (self.mc_num // self.mc_batch_size)

    def _mask_id(self) -> int:
        found = getattr(getattr(self.model, "generation_config", None), "mask_token_id", None)
        found = found if found is not None else getattr(self.tokenizer, "mask_token_id", None)
        if found is None:
            raise ValueError("cannot tell the mask token id: pass model_args mask_id=...")
        return int(found)

    @torch.no_grad()
    def _greedy(self, prefix: torch.Tensor, target: torch.Tensor) -> bool:
        """Whether greedy decoding of the masked continuation writes exactly ``target``: unmask the most confident
        masked position one at a time (LLaDA's ``suffix_greedy_prediction``), stopping at the first token that
        differs (a written token is never changed)."""
        mask_id = self.mask_token
        x = torch.cat([prefix, torch.full_like(target, mask_id)]).to(self.device).unsqueeze(0)
        want = torch.cat([prefix, target]).to(self.device)
        for _ in range(len(target)):
            masked = x[0] == mask_id
            conf, token = self._logits(x)[0].softmax(-1).max(-1)
            pos = int(torch.where(masked, conf, torch.full_like(conf, -1.0)).argmax())
            if int(token[pos]) != int(want[pos]):
                return False
            x[0, pos] = token[pos]
        return True

    def _fit(self, prefix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The context cut from the left so that context + continuation fit ``max_length`` (as lm-eval's HFLM
        does), with a warning; a continuation that leaves no room for one context token is an error."""
        room = self.max_length - len(target)
        if room < 1:
            raise ValueError(f"klass: the continuation alone is {len(target)} tokens; max_length "
                             f"{self.max_length} leaves no room for the context (model_args max_length=...)")
        if len(prefix) > room:
            log.warning("klass: context (%d tokens) + continuation (%d) exceed max_length %d: truncating %d "
                        "tokens of the context from the left", len(prefix), len(target), self.max_length,
                        len(prefix) - room)
            prefix = prefix[-room:]
        return prefix

    def _is_greedy(self, prefix: torch.Tensor, target: torch.Tensor) -> bool:
        if self.check_greedy:
            return self._greedy(prefix, target)
        if not self._greedy_warned:
            self._greedy_warned = True
            log.warning("klass: check_greedy=false: is_greedy is reported False for every request, so the "
                        "metrics built on it (lambada's acc, multiple-choice exact_match) read 0")
        return False

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        from tqdm import tqdm

        out = []
        for instance in tqdm(requests, desc="klass loglikelihood", disable=disable_tqdm or self.rank != 0):
            prefix, target = self._pair(*instance.args[:2])
            if len(target) == 0:
                out.append((0.0, True))
                continue
            prefix = self._fit(prefix, target)
            torch.manual_seed(self._seed(instance, 0))
            out.append((self._mc_loglikelihood(prefix, target), self._is_greedy(prefix, target)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            f"klass: loglikelihood_rolling is not implemented ({ROLLING_TASKS}); generate_until tasks (gsm8k, "
            f"minerva_math, humaneval, mbpp, ...) and loglikelihood tasks ({LOGLIKELIHOOD_TASKS}) run")


def register() -> None:
    """Register ``KlassLM`` as lm-eval's ``klass`` model (idempotent)."""
    from lm_eval.api.registry import register_model

    try:
        register_model(NAME)(KlassLM)
    except ValueError:  # registered already (by another import of this module)
        pass


def add_forwards(results: Optional[dict]) -> Optional[dict]:
    """Put each task's average forwards per request (from ``config.klass``) next to its metrics."""
    info = (results or {}).get("config", {}).get("klass") if isinstance(results, dict) else None
    if not info:
        return results
    for task, value in info.get("per_task", {}).items():
        if task in results.get("results", {}):
            results["results"][task]["forwards,none"] = value["average_forwards"]
            results["results"][task]["forwards_stderr,none"] = "N/A"
            results.get("higher_is_better", {}).setdefault(task, {})["forwards"] = False
    return results


def _device_asked(argv: List[str]) -> bool:
    """Whether lm-eval's arguments name a device: ``--device`` (or an abbreviation, which argparse accepts), or
    a ``device`` key in the ``--config``/``-C`` file."""
    for n, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if len(name) > 2 and "--device".startswith(name):
            return True
        if name in ("--config", "-C") and _config_has_device(value if eq else "".join(argv[n + 1:n + 2])):
            return True
    return False


def _config_has_device(path: str) -> bool:
    try:
        import yaml

        return "device" in (yaml.safe_load(Path(path).read_text()) or {})
    except Exception:  # unreadable: lm-eval reports it; leave its device alone
        return True


def main(argv=None) -> int:
    """lm-eval's command line with the ``klass`` model registered (``argv``: lm-eval's arguments)."""
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    register()
    evaluate = lm_eval.simple_evaluate
    argv = sys.argv[1:] if argv is None else list(argv)
    asked = _device_asked(argv)

    def simple_evaluate(*args, **kwargs):
        if not asked and kwargs.get("device") == LM_EVAL_DEFAULT_DEVICE:
            kwargs["device"] = None  # lm-eval's default, not the user's: KlassLM picks (CUDA if available)
        return add_forwards(evaluate(*args, **kwargs))

    lm_eval.simple_evaluate = simple_evaluate  # lm-eval's CLI imports it from the package when it runs
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
        lm_eval.simple_evaluate = evaluate
    return 0


if __name__ == "__main__":
    from klass_patch.lm_eval import main as _main  # the importable module's class, registered once

    sys.exit(_main())
else:
    register()
