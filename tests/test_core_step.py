"""core.KlassStep, the batched KLASS step: against dense computations of the reference's formulas, its family
rules one by one, and without host reads (issue 19, item 1)."""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from klass_patch import core
from klass_patch.core import EPS, KlassConfig, KlassStep, StepRules

READS = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "argwhere", "masked_select",
         "unique", "cpu", "numpy"}


class Reads(TorchFunctionMode):
    """Counts the torch calls that make the host wait for the device (and boolean-mask indexing)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        mask_index = name in ("__getitem__", "__setitem__") and isinstance(args[1], torch.Tensor) and \
            args[1].dtype == torch.bool
        if name in READS or mask_index or (name == "where" and len(args) == 1):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def dense(logits, p_prev):
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    return p, (p * (torch.log(p + EPS) - torch.log(p_prev + EPS))).sum(-1)


CONFIG = KlassConfig(conf_threshold=0.5, kl_threshold=0.5, kl_history_length=2)


@pytest.mark.parametrize("policy", [None, (3, False), (64, False)], ids=["cpu", "accelerator-3", "accelerator-64"])
def test_observe_matches_the_dense_reference(policy, monkeypatch):
    """Tokens, confidence, KL and history of every window position, read from a strided view of the model's
    output, equal the dense computation over several steps; also with the chunking used off the CPU."""
    if policy is not None:
        monkeypatch.setattr(core, "chunk_policy", lambda device, vocab: policy)
    torch.manual_seed(0)
    rows, width, vocab = 3, 7, 16 * core.BLOCK
    step = KlassStep(CONFIG, StepRules(), rows, width, "cpu")
    p_prev = torch.zeros(rows, width, vocab, dtype=torch.float64)
    history = torch.zeros(rows, width, 2, dtype=torch.float64)
    for _ in range(3):
        full = torch.randn(rows, width + 5, vocab) * 3
        full[0, 4, [5, 9 * core.BLOCK]] = full[0, 4].max() + 1  # a tie (window position 2): the first index wins
        obs = step.observe(full[:, 2:2 + width])
        p, kl = dense(full[:, 2:2 + width], p_prev)
        history = torch.cat([history[..., 1:], kl.unsqueeze(-1)], -1)
        assert torch.equal(obs.tokens, p.argmax(-1)) and torch.equal(obs.confidence, p.max(-1).values)
        assert torch.equal(obs.kl, kl) and torch.equal(step.history, history)
        p_prev = p
    assert int(obs.tokens[0, 2]) == 5


def test_a_step_makes_no_host_read():
    """The whole step (observe and decide, both fallbacks, the guard, each strategy) is tensor work only."""
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 300) * 4
    cand = torch.rand(4, 6) < 0.7
    index = torch.tensor([0, 1, 2, 3])
    for rules in (StepRules(strict=True, guard=True, schedule=(2, 2, 1, 1)), StepRules(low_precision_tokens=True),
                  StepRules(ban_after_token=(3, 7))):
        for strategy in core.STRATEGIES:
            step = KlassStep(KlassConfig(0.3, 0.5, 2, strategy), rules, 4, 6, "cpu")
            step.step(logits, cand, index)  # the state is allocated outside the count
            with Reads() as reads:
                step.step(logits, cand, index)
                step.remember(1, logits[1])
                step.restart(2)
            assert reads.calls == [], (rules, strategy)


def test_top_k_fallback_takes_k_from_the_schedule_per_row():
    """Rows with no ready position unmask their top-k candidates by confidence, each row's k from its own step
    index; torch's own top-k (one call per distinct k), restricted to candidates."""
    torch.manual_seed(2)
    rows, width = 4, 8
    logits = torch.randn(rows, width, 50)
    cand = torch.ones(rows, width, dtype=torch.bool)
    cand[3, 2:] = False  # 2 candidates, k = 3: only the candidates
    schedule = (3, 3, 2, 1)
    index = torch.tensor([0, 2, 3, 1])
    step = KlassStep(KlassConfig(conf_threshold=1.0), StepRules(strict=True, guard=True, schedule=schedule),
                     rows, width, "cpu")
    out = step.step(logits, cand, index)
    for r in range(rows):
        conf = torch.where(cand[r], out.confidence[r], -math.inf)
        want = torch.zeros(width, dtype=torch.bool)
        want[conf.topk(schedule[int(index[r])]).indices] = True
        assert torch.equal(out.commit[r], want & cand[r]), r
    assert out.commit[3].sum() == 2


def test_guard_and_strict_test():
    """LLaDA's rules: '>' and the guard (ready only from step kl_history_length - 1); Dream's: '>='."""
    logits = torch.full((2, 3, 10), -20.0)
    logits[..., 4] = 20.0  # p = 1.0 exactly, the same logits every step: stable from the third step on
    cand = torch.tensor([[True, True, False], [True, False, True]])
    config = KlassConfig(conf_threshold=1.0, kl_threshold=1.0)
    strict = KlassStep(config, StepRules(strict=True, schedule=(0,)), 2, 3, "cpu")  # k = 0: no fallback
    loose = KlassStep(config, StepRules(), 2, 3, "cpu")
    guarded = KlassStep(KlassConfig(conf_threshold=0.9, kl_threshold=1.0), StepRules(guard=True, schedule=(0, 0)),
                        2, 3, "cpu")
    for s in (strict, loose, guarded):
        for _ in range(2):
            s.step(logits, cand, torch.tensor([0, 0]))
    assert not strict.step(logits, cand, torch.tensor([0, 0])).commit.any()  # 1.0 is not > 1.0 ...
    assert torch.equal(loose.step(logits, cand).commit, cand)  # ... but it is >= 1.0
    assert not guarded.step(logits, cand, torch.tensor([0, 0])).commit.any()  # step 0 < kl_history_length - 1
    assert torch.equal(guarded.step(logits, cand, torch.tensor([1, 0])).commit, cand & torch.tensor([[1], [0]]).bool())


def test_single_fallback_is_the_best_low_precision_confidence():
    """Dream: a row with no ready position unmasks one position, the argmax over its candidates of the top
    probability in the logits' dtype (first on ties), with the argmax token in that dtype."""
    torch.manual_seed(3)
    logits = (torch.randn(3, 5, 40) * 2).to(torch.bfloat16)
    cand = torch.tensor([[1, 1, 1, 0, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    step = KlassStep(KlassConfig(conf_threshold=1.0), StepRules(low_precision_tokens=True), 3, 5, "cpu")
    out = step.step(logits, cand)
    low = torch.softmax(logits, dim=-1).max(-1)
    assert torch.equal(out.tokens, low.indices)
    best = torch.where(cand, low.values, -math.inf).argmax(-1)
    for r in range(2):
        assert out.commit[r].nonzero().flatten().tolist() == [int(best[r])]
    assert not out.commit[2].any()  # no candidate: nothing


def test_ban_after_token_and_remember_restart():
    """confidence_eos_eot_inf: the token is the argmax before the banned ids lose their probability; remember()
    makes the next KL against the remembered logits exactly 0, restart() makes it a first KL again."""
    logits = torch.zeros(2, 4, 12)
    logits[..., 7] = 5.0  # a banned id wins before the ban
    logits[..., 2] = 4.0
    step = KlassStep(CONFIG, StepRules(ban_after_token=(7,)), 2, 4, "cpu")
    obs = step.observe(logits)
    assert (obs.tokens == 7).all() and (obs.confidence == 0).all()
    step.remember(0, logits[0])
    step.restart(1)
    kl = step.observe(logits).kl
    assert (kl[0] == 0).all() and torch.equal(kl[1], obs.kl[1]) and (kl[1] > 10).all()
    assert (step.history[:, :, 0] == 0).all()  # the history restarted with the window
