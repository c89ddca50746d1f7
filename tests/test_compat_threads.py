"""compat's L4 (LLaDA built inside from_pretrained on transformers 5.x: torch.nn.init a no-op, as 4.46.2's
no_init_weights() made it) is scoped to the building thread (issue 18, item 13c).

Before: the shim replaced torch.nn.init's functions process-wide while LLaDA was built, so a model that another thread
built meanwhile kept torch.empty's values; and two overlapping builds could leave the no-ops in place for good (the
second saved the first's no-ops as "originals"). Here, without transformers: the mechanism itself, with two and
three threads in lockstep (events, no sleeps). tests/test_compat_standins.py runs it through a real LLaDA load on 5.x.
"""
import threading

import pytest

torch = pytest.importorskip("torch")

from klass_patch import compat  # noqa: E402

TIMEOUT = 60


def _torch_init():
    return {name: getattr(torch.nn.init, name) for name in compat._TORCH_INIT_FUNCTIONS if hasattr(torch.nn.init, name)}


def _initialises():
    """Whether torch.nn.init does anything in this thread (a tensor of 7s drawn afresh by normal_)."""
    x = torch.full((16,), 7.0)
    torch.nn.init.normal_(x)
    return not torch.equal(x, torch.full((16,), 7.0))


class _Step(threading.Thread):
    """A thread that runs ``body(wait, say)``; ``wait(name)`` blocks until ``say(name)`` was called (by any thread)."""

    def __init__(self, body, events):
        super().__init__(daemon=True)
        self.body, self.events, self.error = body, events, None

    def run(self):
        try:
            self.body(lambda name: self.events[name].wait(TIMEOUT) or pytest.fail(f"timed out waiting for {name}"),
                      lambda name: self.events[name].set())
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
            self.error = exc
            for event in self.events.values():  # do not leave the others waiting
                event.set()


def _run(*bodies, names):
    events = {name: threading.Event() for name in names}
    threads = [_Step(body, events) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a thread hung"
    for thread in threads:
        if thread.error is not None:
            raise thread.error


def test_another_thread_initialises_while_one_builds():
    originals = _torch_init()
    torch.manual_seed(5)
    reference = torch.nn.Linear(32, 32).weight.detach().clone()
    seen = {}

    def building(wait, say):
        with compat._torch_init_skipped_in_this_thread():
            seen["builder, inside"] = _initialises()
            say("inside")
            wait("other built")
            seen["builder, after the other built"] = _initialises()
        seen["builder, after"] = _initialises()

    def other(wait, say):
        wait("inside")
        seen["other"] = _initialises()
        torch.manual_seed(5)
        seen["other's Linear"] = torch.nn.Linear(32, 32).weight.detach().clone()
        say("other built")

    _run(building, other, names=("inside", "other built"))
    assert torch.equal(seen.pop("other's Linear"), reference), "the other thread's model was not initialised"
    assert seen == {"builder, inside": False, "other": True, "builder, after the other built": False,
                    "builder, after": True}
    assert _torch_init() == originals  # torch's own functions again, by identity


def test_overlapping_builds_each_skip_until_they_end_and_torch_is_restored():
    """A enters, B enters, A leaves while B is still building: B still skips; after B, torch's own functions."""
    originals = _torch_init()
    seen = {}

    def a(wait, say):
        with compat._torch_init_skipped_in_this_thread():
            say("a inside")
            wait("b inside")
        seen["a after"] = _initialises()
        say("a left")

    def b(wait, say):
        wait("a inside")
        with compat._torch_init_skipped_in_this_thread():
            say("b inside")
            wait("a left")
            seen["b inside, a left"] = _initialises()
            with compat._torch_init_skipped_in_this_thread():  # nested (a model built inside a model's __init__)
                seen["b nested"] = _initialises()
            seen["b after nested"] = _initialises()
        seen["b after"] = _initialises()

    def third(wait, say):  # neither building
        wait("b inside")
        seen["third"] = _initialises()

    _run(a, b, third, names=("a inside", "b inside", "a left"))
    assert seen == {"a after": True, "b inside, a left": False, "b nested": False, "b after nested": False,
                    "b after": True, "third": True}
    assert _torch_init() == originals


def test_exceptions_inside_still_restore():
    originals = _torch_init()
    with pytest.raises(ValueError):
        with compat._torch_init_skipped_in_this_thread():
            assert not _initialises()
            raise ValueError
    assert _initialises() and _torch_init() == originals and compat._no_init_users == 0
