"""The DER++ reference plugin (examples/clbench-derpp) in the default run: it inserts samples into its buffer during
training through the step hooks' ``rows`` with the logits of their step, its matching term uses those stored
logits, and its buffer is a reservoir. These are the example's own tests, imported from its folder; the whole file
(contract and resume included) runs installed in tests/test_examples.py (slow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clbench-derpp"


@pytest.fixture(scope="module")
def derpp_tests():
    sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("derpp_example_tests", EXAMPLE / "tests" / "test_derpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(EXAMPLE))
    sys.modules.pop("clbench_derpp", None)


def test_inserts_during_training_with_the_steps_logits(derpp_tests):
    derpp_tests.test_samples_enter_during_training_with_the_logits_of_their_step()


def test_matching_term_uses_the_stored_logits(derpp_tests):
    derpp_tests.test_the_matching_term_uses_the_logits_stored_at_insertion()


def test_reservoir(derpp_tests):
    derpp_tests.test_reservoir_fills_in_order_then_keeps_every_sample_with_equal_probability()
