"""Run the ``vqprior`` CLI with one method gated, so that a test can stop a real process at an exact point however
loaded the machine is (no test may depend on how fast anything runs). Not a test module.

    python tests/gated_cli.py MODULE:CLASS.METHOD CLI ARGS...

Before each call of the method the process writes ``gate N`` (N = calls so far) to stderr and waits for one byte on
stdin; end of file on stdin opens the gate for good. Gating ``PixelTask.loss`` stops training before step
start + N, with every earlier step (and its checkpoint) done; gating ``VQVAE.encode`` stops an extraction before
batch N.
"""
import importlib
import sys


def main() -> None:
    target, args = sys.argv[1], sys.argv[2:]
    module_name, qualname = target.split(":")
    owner_name, method = qualname.split(".")
    owner = getattr(importlib.import_module(module_name), owner_name)
    real, state = getattr(owner, method), {"calls": 0, "open": False}

    def gated(*a, **kw):
        if not state["open"]:
            sys.stderr.write(f"\ngate {state['calls']}\n")
            sys.stderr.flush()
            state["open"] = not sys.stdin.buffer.read(1)
        state["calls"] += 1
        return real(*a, **kw)

    setattr(owner, method, gated)
    from vqprior.commands.cli import cli

    cli(args, prog_name="vqprior")


if __name__ == "__main__":
    main()
