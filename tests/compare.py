"""Comparing step records with the reference's (its numbering, the precision it keeps).

Decisions (steps, candidate positions and tokens, unmasked positions and tokens) are compared exactly. The
reference rounds confidence and KL (LLaDA to 4 and 6 decimals, Dream to 6 and 10); our unrounded value must lie
within one unit of that last digit of the recorded one, plus a relative 1e-12: the KL is float64 computed from
float32 logits, and its last bits differ between CPUs (rounding both and comparing for equality does not hold
on every machine).
"""
import math

DECIMALS = {"llada": (4, 6), "dream": (6, 10)}


def _is_inf(value):
    return value == "inf" or (isinstance(value, float) and math.isinf(value))


def within_record(ours, recorded, decimals):
    """``ours`` (unrounded) agrees with ``recorded`` (rounded to ``decimals``) to the precision the record keeps."""
    if _is_inf(ours) or _is_inf(recorded):
        return _is_inf(ours) and _is_inf(recorded)
    return abs(ours - recorded) <= 10.0 ** -decimals + 1e-12 * abs(recorded)


def _by_candidate(entries, what):
    table = {(e["position"], e["token_id"]): e for e in entries}
    assert len(table) == len(entries), f"{what}: a position listed twice"
    return table


def assert_steps_match(ours, reference, trace):
    family = trace["family"]
    conf_d, kl_d = DECIMALS[family]
    offset = 1 if family == "llada" else 0  # LLaDA's reference numbers its steps from 1
    assert len(ours) == len(reference) == len(trace["xs"])
    for t, (a, b) in enumerate(zip(ours, reference)):
        assert a["step"] + offset == b["step"], t
        mine, theirs = _by_candidate(a["all_tokens"], f"step {t}"), _by_candidate(b["all_tokens"], f"step {t}")
        assert sorted(mine) == sorted(theirs), f"step {t}: candidates differ"
        for key, e in mine.items():
            r = theirs[key]
            assert within_record(e["confidence"], r["confidence"], conf_d), \
                f"step {t}, candidate {key}: confidence {e['confidence']!r}, recorded {r['confidence']!r}"
            assert within_record(e["kl_divergence"], r["kl_divergence"], kl_d), \
                f"step {t}, candidate {key}: KL {e['kl_divergence']!r}, recorded {r['kl_divergence']!r}"
        # The LLaDA reference's fallback can list a position that was no longer masked (top-k with k larger
        # than the masks left); it was not unmasked at this step, so it is not compared.
        masked = set((trace["xs"][t][0] == trace["mask_id"]).nonzero().flatten().tolist())
        dec_a = sorted((e["position"], e["token_id"]) for e in a["decoded_tokens"])
        dec_b = sorted((e["position"], e["token_id"]) for e in b["decoded_tokens"] if e["position"] in masked)
        assert dec_a == dec_b, f"step {t}: unmasked positions differ"
        assert a["decoded_tokens_num"] == len(dec_a)
        assert all(e["row"] == 0 for e in a["all_tokens"] + a["decoded_tokens"])
