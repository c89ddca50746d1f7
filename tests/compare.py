"""Comparing step records with the reference's (its rounding, its numbering)."""
import math

ROUNDING = {"llada": (4, 6), "dream": (6, 10)}


def _kl(value, digits):
    if value == "inf" or (isinstance(value, float) and math.isinf(value)):
        return "inf"
    return round(value, digits)


def assert_steps_match(ours, reference, trace):
    family = trace["family"]
    conf_d, kl_d = ROUNDING[family]
    offset = 1 if family == "llada" else 0  # LLaDA's reference numbers its steps from 1
    assert len(ours) == len(reference) == len(trace["xs"])
    for t, (a, b) in enumerate(zip(ours, reference)):
        assert a["step"] + offset == b["step"], t
        mine = sorted((e["position"], e["token_id"], round(e["confidence"], conf_d), _kl(e["kl_divergence"], kl_d))
                      for e in a["all_tokens"])
        theirs = sorted((e["position"], e["token_id"], e["confidence"], _kl(e["kl_divergence"], kl_d))
                        for e in b["all_tokens"])
        assert mine == theirs, f"step {t}: candidates differ"
        # The LLaDA reference's fallback can list a position that was no longer masked (top-k with k larger
        # than the masks left); it was not unmasked at this step, so it is not compared.
        masked = set((trace["xs"][t][0] == trace["mask_id"]).nonzero().flatten().tolist())
        dec_a = sorted((e["position"], e["token_id"]) for e in a["decoded_tokens"])
        dec_b = sorted((e["position"], e["token_id"]) for e in b["decoded_tokens"] if e["position"] in masked)
        assert dec_a == dec_b, f"step {t}: unmasked positions differ"
        assert a["decoded_tokens_num"] == len(dec_a)
        assert all(e["row"] == 0 for e in a["all_tokens"] + a["decoded_tokens"])
