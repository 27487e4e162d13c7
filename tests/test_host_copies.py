"""Copies from the device to the host in the per-position loops of guided pixel sampling and the lossless coder, and
the EMA's fused update, checked on the CPU.

On a GPU each copy to the host waits for every queued kernel. ``DeviceTracker`` stands a fake device in for the GPU:
the model's parameters are "on the device", and so is every tensor computed from one, drawn by a factory given a
``device``, or moved by ``.to(device)`` from the host; a read (``.cpu()``, ``.to("cpu")``, ``.numpy()``,
``.item()``, ``.tolist()``, ``bool``/``float``/``int``) of such a tensor is a copy to the host, counted, and its
result is on the host."""
from __future__ import annotations

import weakref

import pytest
import torch

from conftest import tiny_model
from vqprior.sampling.sampler import sample
from vqprior.training.run_state import EMA

READS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _names_a_device(args, kwargs) -> bool:
    return any(isinstance(a, (torch.device, str)) and torch.device(a).type == "cpu"
               for a in (*args[1:], kwargs.get("device")) if a is not None and not isinstance(a, torch.dtype))


class DeviceTracker(torch.overrides.TorchFunctionMode):
    def __init__(self, model):
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}  # id -> the tensor "on the device" (ids of dead tensors are reused)
        for t in [*model.parameters(), *model.buffers()]:
            self.add(t)
        self.reads = 0

    def add(self, t: torch.Tensor) -> None:
        self.refs[id(t)] = weakref.ref(t)

    def on_device(self, t: torch.Tensor) -> bool:
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs_on_device = any(self.on_device(t) for t in _tensors((args, kwargs)))
        moves = func is torch.Tensor.to and _names_a_device(args, kwargs)
        if func in READS or (moves and inputs_on_device):
            self.reads += int(inputs_on_device)
            return out if not isinstance(out, torch.Tensor) or not inputs_on_device else out.detach().clone()
        if inputs_on_device or moves or kwargs.get("device") is not None:
            for t in _tensors(out):
                self.add(t)
        return out


def pixel_model():
    model = tiny_model(dtype=torch.float32, height=4, width=4, num_classes=3, null_class=True).eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "class_embedding", None) is not None:
                m.class_embedding.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["unguided", "guided"])
def test_pixel_sampling_copies_to_the_host_at_most_once_per_position(guidance):
    model = pixel_model()
    with DeviceTracker(model) as tracker:
        sample(model, 2, label=torch.tensor([0, 2]), guidance=guidance, generator=torch.Generator().manual_seed(0))
    assert tracker.reads <= 4 * 4 + 2, tracker.reads  # 16 positions, and the labels' range check once per call


@pytest.mark.parametrize("head", ["pixels", "codes"])
def test_the_coder_copies_to_the_host_at_most_once_per_position(head):
    pytest.importorskip("constriction")
    from vqprior.compress.coding import Encoder, code_codes, code_pixels

    if head == "pixels":
        model = pixel_model()
        values = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        run = lambda side: code_pixels(model, side, tuple(values.shape), values, torch.tensor([0, 1]))  # noqa: E731
    else:
        model = tiny_model(dtype=torch.float32, head="codes", num_codes=8, height=4, width=4).eval()
        values = torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(2))
        run = lambda side: code_codes(model, side, tuple(values.shape), values)  # noqa: E731
    with torch.no_grad(), DeviceTracker(model) as tracker:
        assert torch.equal(run(Encoder()), values)
    assert tracker.reads <= 4 * 4, tracker.reads


def test_the_ema_update_is_fused_over_every_parameter():
    """CUDA runs a foreach op as one fused kernel only when its tensor lists match shape for shape; a list of 0-d
    weights against the parameters (what a per-step device weight used to be) falls back to one kernel per
    parameter. Every op of the update must be a foreach op over matching lists, whatever the parameter count."""

    class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((func, args))
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(*[torch.nn.Linear(3 + i, 4 + i) for i in range(5)])
    ema = EMA(model, 0.99)
    applied = torch.tensor(1.0)
    ema.update(model, step=100, applied=applied)  # built once
    with Recorder() as recorder:
        ema.update(model, step=100, applied=applied)
    foreach = [(func, args) for func, args in recorder.calls if "_foreach_" in func.__name__]
    others = [func.__name__ for func, _ in recorder.calls if "_foreach_" not in func.__name__]
    assert len(foreach) <= 3 and all(name.startswith("mul") for name in others), others
    for func, args in foreach:
        lists = [a for a in args if isinstance(a, (list, tuple))]
        shapes = [[t.shape for t in lst] for lst in lists]
        assert all(s == shapes[0] for s in shapes), (func.__name__, shapes)
