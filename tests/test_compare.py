"""The step-record comparison: decisions exact, recorded floats within the precision the record keeps."""
import pytest
import torch

from compare import assert_steps_match, within_record


def _trace(family="dream"):
    xs = torch.tensor([[[5, 9, 9]]])  # one forward; positions 1 and 2 masked (mask id 9)
    return dict(family=family, xs=xs, mask_id=9)


def _step(kl, token=7, conf=0.5, step=0):
    entry = dict(position=1, token_id=token, confidence=conf, kl_divergence=kl, row=0)
    return dict(step=step, all_tokens=[entry], decoded_tokens=[dict(entry)], decoded_tokens_num=1)


def test_kl_differing_between_cpus_in_its_11th_digit_matches():
    # Seen on an AMD EPYC: ours 27.01282425014711 rounds to ...2501, the record says ...2502.
    assert_steps_match([_step(27.01282425014711)], [_step(27.0128242502)], _trace())


@pytest.mark.parametrize("ours", [27.0128242504, 27.0128242500 - 1e-10])
def test_kl_two_units_off_in_the_last_recorded_digit_fails(ours):
    with pytest.raises(AssertionError, match="KL"):
        assert_steps_match([_step(ours)], [_step(27.0128242502)], _trace())


def test_decisions_are_exact():
    with pytest.raises(AssertionError, match="candidates differ"):
        assert_steps_match([_step(1.0, token=8)], [_step(1.0, token=7)], _trace())
    with pytest.raises(AssertionError, match="confidence"):
        assert_steps_match([_step(1.0, conf=0.50021)], [_step(1.0, conf=0.5, step=1)], _trace("llada"))  # 4 decimals


def test_within_record():
    assert within_record(0.12345, 0.1235, 4) and not within_record(0.1237, 0.1235, 4)
    assert within_record(float("inf"), "inf", 6) and not within_record(1e9, "inf", 6)
    assert within_record(1e6 + 1e-7, 1e6, 10)  # relative 1e-12 of a large value
