"""The algorithm's pieces against direct, dense computations of the reference's formulas."""
import math

import pytest
import torch

from klass_patch.core import EPS, KlassConfig, StabilityTracker, select_ready, write_steps_jsonl


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
