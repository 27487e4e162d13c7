"""Whose error it is decides what the CLI shows: bad input is one ``Error:`` line (tests/test_bad_inputs_*.py hold
a row per case); a bug inside the library, even one raising ValueError or KeyError, keeps its traceback and ends
with one line asking to report it."""
import subprocess
import sys

import pytest

from vqprior.errors import InputError, UserError

# A library bug deep inside a command: the model's forward raises as a broken layer would.
BUG = """
import sys
import vqprior.models.pixelsnail as p

def broken(self, *args, **kwargs):
    raise {error}("an internal inconsistency")

p.PixelSNAIL.forward = broken
from vqprior.commands.cli import main
sys.argv = ["vqprior", "evaluate", "checkpoints/cifar10-pixels-small.pt", "--dataset", "sample", "--limit", "2",
            "--device", "cpu"]
main()
"""


@pytest.mark.parametrize("error", ["ValueError", "KeyError", "RuntimeError"])
def test_a_library_bug_keeps_its_traceback_and_asks_for_a_report(error):
    from conftest import REPO
    from vqprior.commands.common import BUG_LINE

    done = subprocess.run([sys.executable, "-c", BUG.format(error=error)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert f"{error}: " in done.stderr and "an internal inconsistency" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == BUG_LINE
    assert not any(line.startswith("Error:") for line in done.stderr.splitlines())


def test_input_errors_are_user_errors_and_value_errors():
    """Python callers catch bad arguments as ValueError; the CLI shows them as one line."""
    assert issubclass(InputError, UserError) and issubclass(InputError, ValueError)
    import torch

    from conftest import tiny_model

    with pytest.raises(ValueError, match="expected images"):
        tiny_model().log_prob(torch.zeros(1, 1, 5, 5, dtype=torch.uint8))
