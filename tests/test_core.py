"""The algorithm's pieces against direct, dense computations of the reference's formulas."""
import math

import pytest
import torch

from klass_patch import core
from klass_patch.core import (BLOCK, EPS, KlassConfig, StabilityTracker, _chunks, first_max, low_precision_max_position,
                              select_ready, write_steps_jsonl)


def dense_kl(logits, p_prev):
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    return p, (p * (torch.log(p + EPS) - torch.log(p_prev + EPS))).sum(-1)


def test_tracker_matches_the_dense_reference_over_a_ring_window():
    torch.manual_seed(0)
    rows, length, start, vocab, n = 2, 14, 4, 50, 3
    tracker = StabilityTracker(rows, length, start, 6, n, "cpu")  # window of 6 over 10 positions: a ring
    p_prev = torch.zeros(rows, length, vocab, dtype=torch.float64)
    history = torch.zeros(rows, length, n, dtype=torch.float64)
    for step in range(6):
        logits = torch.randn(rows, length, vocab) * 3
        lo = start + (step // 3) * 3  # this step's positions: 3 at a time, moving right
        pos = torch.arange(lo, lo + 3).repeat(rows)
        r = torch.arange(rows).repeat_interleave(3)
        tok, conf, kl = tracker.update(logits[r, pos], r, pos)
        p, ref_kl = dense_kl(logits, p_prev)
        history = torch.cat([history[..., 1:], ref_kl.unsqueeze(-1)], -1)
        assert torch.equal(kl, ref_kl[r, pos])
        assert torch.equal(tok, p.argmax(-1)[r, pos])
        assert torch.equal(conf, p.max(-1).values[r, pos])
        # positions are advanced only while tracked: the entries since they joined match the dense history
        k = step % 3 + 1
        assert torch.equal(tracker.history[r, pos, -k:], history[r, pos, -k:])
        nxt = torch.arange(lo + 3, lo + 6).repeat(rows)  # the next group gets this step's distribution
        tracker.remember(logits[r, nxt], r, nxt)
        p_prev = p
    first = StabilityTracker(1, 3, 0, 3, 1, "cpu").update(torch.zeros(3, 10), torch.zeros(3, dtype=torch.long),
                                                             torch.arange(3))[2]
    assert torch.allclose(first, torch.full((3,), math.log(1 / EPS) - math.log(10), dtype=torch.float64))


@pytest.mark.parametrize("policy", [None, (3, False), (64, False)], ids=["cpu", "accelerator-3", "accelerator-64"])
def test_tracker_reads_scattered_positions_of_the_whole_output(policy, monkeypatch):
    """Positions in runs (read through views), isolated ones (gathered), runs across rows and a ring that
    wraps, read at a shifted position, with a vocabulary long enough for the blocked maximum: every value
    equals the dense computation, ties at the top included. Also with the chunking used off the CPU."""
    if policy is not None:
        monkeypatch.setattr(core, "chunk_policy", lambda device, vocab: policy)
    torch.manual_seed(2)
    rows, length, start, width, vocab = 3, 40, 6, 12, 16 * BLOCK
    tracker = StabilityTracker(rows, length, start, width, 2, "cpu")
    p_prev = torch.zeros(rows, length, vocab, dtype=torch.float64)
    for step in range(5):
        logits = torch.randn(rows, length, vocab) * 3
        logits[0, :, 3 * BLOCK + 5] = logits[0, :, 9 * BLOCK + 1] = logits[0].amax(-1) + 1  # tie across blocks
        logits[1, :, 7] = logits[1, :, 100] = logits[1].amax(-1) + 1  # tie inside a block
        cand = torch.rand(rows, length) < 0.6
        lo = start + 4 * step  # a window of `width` positions that moves right, so slots wrap around
        cand[:, :lo] = False
        cand[:, lo + width:] = False
        cand[2, lo:lo + 6] = True  # one long run
        r, pos = cand.nonzero(as_tuple=True)
        read = pos - 1
        shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # shifted[:, i] = logits[:, i - 1]
        tok, conf, kl = tracker.update(logits, r, pos, read_pos=read)
        p, ref_kl = dense_kl(shifted, p_prev)
        top = p.max(-1)
        assert torch.equal(tok, top.indices[r, pos]) and torch.equal(conf, top.values[r, pos])
        assert torch.equal(kl, ref_kl[r, pos])
        # untracked positions keep their old distribution; those entering the window next step (in the slots
        # of those leaving it) get this step's, as LLaDA does for its next block
        nxt = torch.arange(lo + width, lo + width + 4).repeat(rows)
        r_nxt = torch.arange(rows).repeat_interleave(4)
        tracker.remember(shifted[r_nxt, nxt], r_nxt, nxt)
        entering = torch.zeros_like(cand)
        entering[:, lo + width:lo + width + 4] = True
        p_prev = torch.where((cand | entering).unsqueeze(-1), p, p_prev)
    assert {3 * BLOCK + 5, 7}.issubset(set(tok.tolist()))


@pytest.mark.parametrize("size, split_runs", [(1, True), (4, True), (4, False), (60, False)])
def test_chunks_tile_the_entries_and_flag_only_true_runs(size, split_runs):
    """A range read through a view must be a true run; on a CPU (``split_runs``) every run piece of 2 or
    more entries is read through a view and lone entries are grouped."""
    g = torch.Generator().manual_seed(5)
    for trial in range(40):
        cand = torch.rand(3, 30, generator=g) < (0.3, 0.8, 1.0)[trial % 3]
        rows, pos = cand.nonzero(as_tuple=True)
        width, dense = (30, 11)[trial % 2], trial % 5 == 0
        slots, read = rows * width + (pos - 2) % width, pos - trial % 2
        ranges = _chunks(rows, read, slots, dense, size, split_runs)
        assert [a for a, *_ in ranges] == [0] + [b for _, b, *_ in ranges[:-1]] and ranges[-1][1] == len(rows)
        for a, b, run, row, at, slot in ranges:
            assert 1 <= b - a <= size and (row, at, slot) == (rows[a], read[a], slots[a])
            follows = (slots[a + 1:b] == slots[a:b - 1] + 1) & (
                dense | ((rows[a + 1:b] == rows[a:b - 1]) & (read[a + 1:b] == read[a:b - 1] + 1)))
            if run or not split_runs:  # a view only over a true run; a fixed range that is one is read as a view
                assert bool(run) == bool(follows.all())
            else:  # lone entries only: no two of them could share a view
                assert not follows.any()


def test_first_max_is_torchs_max_with_the_first_index_on_ties():
    torch.manual_seed(3)
    p = torch.rand(6, 16 * BLOCK, dtype=torch.float64)
    p[0, [5, 3 * BLOCK, 9 * BLOCK + 2]] = 2.0  # ties in different blocks
    p[1, [BLOCK + 1, BLOCK + 7]] = 2.0  # ties in one block
    p[2, -1] = 2.0  # last entry
    p[3] = 1.0  # all equal
    p[4, [7, 7 + 4 * BLOCK]] = torch.tensor([2.0, 1.5], dtype=p.dtype)  # runner-up in another block
    p[5, [7, 9]] = torch.tensor([2.0, 1.5], dtype=p.dtype)  # runner-up in the top's block
    for q in (p, p[:, : 16 * BLOCK - 3], p.float()):  # blocked path, plain path (length not a multiple), float32
        assert all(torch.equal(a, b) for a, b in zip(first_max(q), q.max(-1)))
        top, idx, runner_up = first_max(q, second=True)
        # the largest value at any index but the top's: ties count, the top's own entry does not
        assert torch.equal(runner_up, q.scatter(-1, idx.unsqueeze(-1), -1.0).amax(-1))
        assert torch.equal(top, q.max(-1).values)
    assert first_max(p)[1][:4].tolist() == [5, BLOCK + 1, 16 * BLOCK - 1, 0]
    assert first_max(p, second=True)[2][:6].tolist() == [2.0, 2.0, p[2, :-1].max().item(), 1.0, 1.5, 1.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_tokens_are_upstreams_argmax_near_ties_included(dtype):
    """Dream's token is the argmax of the softmax in the logits' dtype: rounding can tie two probabilities,
    and then the first index wins, although the float64 argmax is the other one."""
    length, vocab = 8, 300
    logits = torch.full((1, length, vocab), -30.0, dtype=dtype)
    base = torch.tensor(0.25, dtype=dtype)
    ulp = torch.finfo(dtype).eps * 0.25
    for i in range(length):  # index 9 above index 7 by i ulps (0: an exact tie)
        logits[0, i, 7] = base
        logits[0, i, 9] = (base.float() + i * ulp).to(dtype)
    r, pos = torch.zeros(length, dtype=torch.long), torch.arange(length)
    tok, conf, _ = StabilityTracker(1, length, 0, length, 2, "cpu").update(logits, r, pos, low_precision_tokens=True)
    expected = torch.softmax(logits[0], dim=-1).max(-1).indices
    assert 7 in expected[1:].tolist() and 9 in expected.tolist()  # the cases happen: ties lost, ties won
    assert torch.equal(tok, expected)
    p64 = torch.softmax(logits[0].to(torch.float64), dim=-1)
    assert torch.equal(conf, p64.gather(-1, expected.unsqueeze(-1)).squeeze(-1))


def test_fallback_position_is_upstreams_argmax_over_low_precision_confidence():
    """Dream's fallback position: argmax over positions of the bfloat16 top probability, where confidences
    just below 1 round to the same value and the first such position wins."""
    torch.manual_seed(1)
    rows, length, vocab = 3, 10, 200
    logits = torch.zeros(rows, length, vocab)
    logits[..., 0] = 10 + torch.rand(rows, length) * 0.2
    logits[1, :5, 0] = 2.0  # row 1: positions 5.. only are confident
    logits = logits.to(torch.bfloat16)
    cand = torch.ones(rows, length, dtype=torch.bool)
    cand[0, :3] = False
    r, pos = cand.nonzero(as_tuple=True)
    conf64 = torch.full((rows, length), -math.inf, dtype=torch.float64)
    conf64[r, pos] = torch.softmax(logits[r, pos].to(torch.float64), -1).amax(-1)
    pick = low_precision_max_position(logits, torch.arange(length), conf64, cand)
    low = torch.full((rows, length), -math.inf)
    low[r, pos] = torch.softmax(logits[r, pos], -1).amax(-1).float()
    assert not torch.equal(conf64.argmax(-1), low.argmax(-1))  # float64 alone would pick differently
    assert torch.equal(pick, low.argmax(-1))


def test_strategies_pick_like_the_reference():
    ready = torch.tensor([[False, True, True, True], [False, False, False, False]])
    conf = torch.tensor([[0.99, 0.7, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]], dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.002, 0.001, 0.001], [0, 0, 0, 0]], dtype=torch.float64)
    assert torch.equal(select_ready(ready, conf, kl, "all"), ready)
    # ties go to the lowest position; a row with nothing ready gets nothing
    assert select_ready(ready, conf, kl, "max_conf").nonzero().tolist() == [[0, 2]]
    assert select_ready(ready, conf, kl, "min_kl").nonzero().tolist() == [[0, 2]]


def test_config_reads_call_then_defaults():
    kwargs = dict(conf_threshold=0.6, other=1)
    defaults = type("GC", (), dict(kl_threshold=0.001, unmask_strategy=None))()
    cfg = KlassConfig.from_kwargs(kwargs, defaults)
    assert cfg == KlassConfig(0.6, 0.001, 2, "all") and kwargs == dict(other=1)
    with pytest.raises(ValueError, match="conf_threshold"):
        KlassConfig(conf_threshold=2)


def test_steps_jsonl(tmp_path):
    records = [{"step": 0, "decoded_tokens_num": 1, "decoded_tokens": [], "all_tokens": []}] * 2
    write_steps_jsonl(records, tmp_path / "s.jsonl")
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"decoded_tokens_num": 1' in lines[0]
