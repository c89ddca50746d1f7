"""Batches: row i of a batch comes out exactly as its prompt alone (tokens, step log, used_steps)."""
import inspect
from types import SimpleNamespace

import pytest
import torch

import klass_patch
from compare import assert_steps_match
from conftest import load_file, needs_transformers, sources
from replay import DEVICE, DREAM_SPECIAL, GOLDEN, dream_kwargs, dream_replay_class, full_logits, reference_steps

PAD = {"llada": 126081, "dream": 151643}
GROUPS = {}
for path in sorted((GOLDEN / "batch").glob("g*_*.pt")):
    GROUPS.setdefault(path.name.split("_")[0], []).append(path.name)
PADDINGS = {"unpadded": [0, 0, 0, 0], "left-padded": [0, 3, 1, 5]}


def load_group(group):
    return [torch.load(GOLDEN / "batch" / name, weights_only=True) for name in GROUPS[group]]


class BatchReplay:
    """Each row's logits depend on that row's ids only: row i's t-th forward must be trace i's t-th input."""

    def __init__(self, rows, pads):
        self.rows, self.pads = rows, pads
        self.calls = [0] * len(rows)
        self.device = DEVICE
        self.lm_head = SimpleNamespace(out_features=rows[0]["vocab_size"])

    def __call__(self, x, *args, **kwargs):
        trace = self.rows[0]
        x = x.cpu()
        out = torch.full((*x.shape, trace["vocab_size"]), float(trace["fill"]), device=DEVICE)
        for i, (tr, pad) in enumerate(zip(self.rows, self.pads)):
            ids = x[i, pad:]
            t = self.calls[i]
            if t < len(tr["xs"]) and torch.equal(ids, tr["xs"][t][0]):
                out[i, pad:] = full_logits(tr, t)[0]
                self.calls[i] += 1
            else:
                assert torch.equal(ids, tr["output"][0]), f"row {i} diverged from its trace at its forward {t}"
        return SimpleNamespace(logits=out)


def batch_inputs(rows, pads, family):
    width = max(tr["prompt"].shape[1] + p for tr, p in zip(rows, pads))
    prompt = torch.full((len(rows), width), PAD[family])
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (tr, pad) in enumerate(zip(rows, pads)):
        n = tr["prompt"].shape[1]
        prompt[i, width - n:], mask[i, width - n:] = tr["prompt"][0], 1
    return prompt.to(DEVICE), mask.to(DEVICE), [width - tr["prompt"].shape[1] for tr in rows]


def check_rows(out, model, rows, pads):
    for i, (tr, pad) in enumerate(zip(rows, pads)):
        assert torch.equal(out.sequences[i, pad:].cpu(), tr["output"][0]), f"row {i}"
        assert model.calls[i] == len(tr["xs"]) == int(out.used_steps[i]), f"row {i}"
        mine = []
        for rec in out.history[: len(tr["xs"])]:
            pick = [dict(e, row=0, position=e["position"] - pad) for e in rec["all_tokens"] if e["row"] == i]
            done = [dict(e, row=0, position=e["position"] - pad) for e in rec["decoded_tokens"] if e["row"] == i]
            mine.append(dict(rec, all_tokens=pick, decoded_tokens=done, decoded_tokens_num=len(done)))
        assert_steps_match(mine, reference_steps(tr), tr)
        assert all(e["row"] != i for rec in out.history[len(tr["xs"]):] for e in rec["all_tokens"])


@pytest.fixture(scope="module", params=sources("llada"))
def llada_module(request):
    module = load_file(request.param)
    if "attention_mask" not in inspect.signature(module.generate).parameters:
        pytest.skip("this generate.py has no attention_mask: batch size 1 only")
    return module


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("group", [g for g in GROUPS if "llada" in GROUPS[g][0]])
def test_llada_batch_rows_are_exact(llada_module, group, padding):
    klass_patch.apply(llada_module)
    rows = load_group(group)
    tr = rows[0]
    prompt, mask, pads = batch_inputs(rows, PADDINGS[padding], "llada")
    model = BatchReplay(rows, pads)
    out = llada_module.generate(
        model, prompt, mask if padding != "unpadded" else None, steps=tr["steps"], gen_length=tr["gen_length"],
        block_length=tr["block_length"], mask_id=tr["mask_id"], alg="klass",
        conf_threshold=tr["conf_threshold"], kl_threshold=tr["kl_threshold"],
        kl_history_length=tr["kl_history_length"], unmask_strategy=tr["unmask_strategy"],
        save_steps=True, return_dict_in_generate=True)
    check_rows(out, model, rows, pads)


@pytest.mark.parametrize("path", sources("dream"))
@pytest.mark.parametrize("padding", PADDINGS)
def test_dream_batch_rows_are_exact(path, padding):
    needs_transformers(path)
    module = load_file(path)
    klass_patch.apply(module)
    for group in [g for g in GROUPS if "dream" in GROUPS[g][0]]:
        rows = load_group(group)
        prompt, mask, pads = batch_inputs(rows, PADDINGS[padding], "dream")
        cls = dream_replay_class(module.DreamGenerationMixin, module.DreamGenerationConfig(**DREAM_SPECIAL))

        class Model(BatchReplay, cls):
            def __init__(self):
                cls.__init__(self, rows[0])
                BatchReplay.__init__(self, rows, pads)

            def __call__(self, x, attention_mask=None, tok_idx=None):
                if padding != "unpadded":  # upstream builds the pairwise mask and positions from ours
                    assert attention_mask.shape == (len(rows), 1, x.shape[1], x.shape[1]) and tok_idx is not None
                return BatchReplay.__call__(self, x)

        model = Model()
        kwargs = dream_kwargs(rows[0])
        if padding != "unpadded":
            kwargs["attention_mask"] = mask
        out = model.diffusion_generate(prompt, generation_config=module.DreamGenerationConfig(**DREAM_SPECIAL),
                                       **kwargs)
        check_rows(out, model, rows, pads)
