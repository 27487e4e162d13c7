"""The static-shape cached sampler (what ``sample(compile=...)`` / ``--compile`` runs) and the generator check.

Static shapes: its parameters equal a full forward pass (float64) and the dynamic cached path (float32, to rounding);
under ``torch.compile`` one graph serves every position (a counting backend and ``error_on_recompile`` show it), and
the compiled samples equal the eager cached samples for the same seed. A generator on another device than the model
is refused up front with one line.
"""
import pytest
import torch
import torch._dynamo

from conftest import VARIANTS, H, W, make_inputs, make_model, max_step_error, value_at
from vqprior.sampling.sampler import CachedSampler, SamplingError, _same_device, check_generator, complete, sample


@pytest.mark.parametrize("variant", VARIANTS)
def test_static_params_equal_forward_float64(variant):
    model = make_model(variant)
    assert max_step_error(model, start=0, static=True) < 1e-10
    assert max_step_error(model, start=W + 2, static=True) < 1e-10


@pytest.mark.parametrize("variant", ["rgb", "gray-k3-heads2", "codes-class-cond-k3-heads2", "codes-cond-no-attn"])
def test_static_params_equal_dynamic_float32(variant):
    """Same inputs through both ways of stepping: the convolutions gather the same windows into the same matmuls;
    only attention sums over L instead of p terms (masked ones are exact zeros), so float32 agrees to rounding."""
    model = make_model(variant, dtype=torch.float32)
    x, label, cond = make_inputs(model, batch=3)
    dynamic, static = (CachedSampler(model, 3, label, cond, static=s) for s in (False, True))
    error = 0.0
    with torch.no_grad():
        for p in range(H * W):
            a, b = dynamic.step(p), static.step(p)
            error = max(error, (a - b).abs().max().item())
            dynamic.append(p, value_at(x, p))
            static.append(p, value_at(x, p))
    assert error < 1e-5
    if not model.config.attention:
        assert error == 0.0  # no attention: the very same arithmetic


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly (fast on CPU)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


class ZeroDimIndexing(torch.overrides.TorchFunctionMode):
    """Records every ``t[i]`` / ``t[i] = v`` whose index holds a 0-d tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dim() == 0 for i in index):
                self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["rgb", "codes-class-cond-k3-heads2", "codes-cond-no-attn"])
def test_static_step_never_indexes_with_a_zero_dim_tensor(variant):
    """torch.compile in torch 2.13 (the GPU machines run 2.11) reads ``t[p]`` for a 0-d tensor p as an integer
    index and guards on ``p.item()``: the static step then recompiled at every position. The pinned torch does not,
    so the compile-once test above would not catch a ``t[p]`` coming back; this one does on any torch."""
    model = make_model(variant, dtype=torch.float32)
    x, label, cond = make_inputs(model, batch=2)
    sampler = CachedSampler(model, 2, label, cond, static=True)
    with torch.no_grad(), ZeroDimIndexing() as mode:
        for p in range(3):
            sampler.step(p)
            sampler.append(p, value_at(x, p))
    assert mode.seen == []


@pytest.mark.parametrize("variant", ["rgb", "codes-class-cond-k3-heads2"])
def test_compiled_step_compiles_once_for_all_positions(variant):
    model = make_model(variant, dtype=torch.float32)
    _, label, cond = make_inputs(model, batch=4)
    backend = CountingBackend()
    torch._dynamo.reset()
    draw = dict(label=label, condition=cond)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = sample(model, 4, generator=torch.Generator().manual_seed(0), compile={"backend": backend}, **draw)
        assert backend.graphs == 2  # the step and the append, each once for all H * W positions
        again = sample(model, 4, generator=torch.Generator().manual_seed(0), compile={"backend": backend}, **draw)
        assert backend.graphs == 2  # a new sampler of the same shapes reuses both graphs
    eager = sample(model, 4, generator=torch.Generator().manual_seed(0), **draw)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


def test_compiled_completion_keeps_prefix_and_equals_eager():
    model = make_model("codes", dtype=torch.float32)
    x, _, _ = make_inputs(model, batch=2)
    torch._dynamo.reset()
    runs = [complete(model, x, keep_rows=2, num=2, generator=torch.Generator().manual_seed(5), **kw)
            for kw in ({"compile": {"backend": "aot_eager"}}, {})]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :2], x.repeat_interleave(2, 0)[:, :2])


def test_compile_is_refused_for_the_naive_sampler_and_must_be_bool_or_options():
    model = make_model("codes", dtype=torch.float32)
    with pytest.raises(SamplingError, match="cached sampler"):
        sample(model, 2, method="naive", compile=True)
    with pytest.raises(SamplingError, match="compile must be"):
        sample(model, 2, compile="yes")
    with pytest.raises(ValueError, match="static=True"):
        CachedSampler(model, 2).compile()


def test_a_generator_on_another_device_is_refused_up_front():
    model = make_model("codes", dtype=torch.float32).to("meta")  # stands in for a model on a GPU
    with pytest.raises(SamplingError, match="generator is on cpu but the model is on meta") as e:
        sample(model, 2, generator=torch.Generator())
    assert "\n" not in str(e.value)
    with pytest.raises(SamplingError, match="generator is on cpu but the model is on meta"):
        complete(model, torch.zeros(H, W, dtype=torch.long), keep_rows=1, num=1, generator=torch.Generator())
    with pytest.raises(SamplingError, match="torch.Generator"):
        sample(make_model("codes"), 2, generator=0)
    with pytest.raises(SamplingError, match="model is on cuda:0"):
        check_generator(torch.Generator(), torch.device("cuda:0"))


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    """The generator check's device equality: ``cuda`` and ``cuda:N`` are one device exactly when N is the current
    CUDA device (``cpu`` and ``cpu:0`` always are); other types or indices never are."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    same = [("cuda", "cuda:1"), ("cuda:1", "cuda"), ("cuda", "cuda"), ("cuda:0", "cuda:0"), ("cpu", "cpu:0"),
            ("cpu", "cpu")]
    different = [("cuda", "cuda:0"), ("cuda:0", "cuda"), ("cuda:0", "cuda:1"), ("cpu", "cuda"), ("cuda:1", "cpu"),
                 ("cpu:1", "cpu")]
    assert all(_same_device(torch.device(a), torch.device(b)) for a, b in same)
    assert not any(_same_device(torch.device(a), torch.device(b)) for a, b in different)


def test_compiled_sampling_runs_under_bf16_autocast():
    """Under bf16 autocast the step's matrix products return bfloat16 while the maps stay float32: the static
    writes cast (index_copy_ would refuse mixed dtypes)."""
    model = make_model("codes-class-cond-k3-heads2", dtype=torch.float32)
    _, label, cond = make_inputs(model, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample(model, 2, label=label, condition=cond, compile={"backend": "eager"})
    assert out.shape == (2, H, W) and 0 <= out.min() and out.max() < model.config.num_codes


@pytest.mark.parametrize("variant", ["rgb", "codes-class-cond-k3-heads2"])
def test_static_step_projects_the_head_in_float32_and_samples_as_eager_under_bf16(variant):
    """Under bf16 autocast the eager cached step projects the head in float32 (as training does); the static step
    behind ``--compile`` does the same, so compiled bf16 sampling draws what eager bf16 sampling draws."""
    model = make_model(variant, dtype=torch.float32)
    x, label, cond = make_inputs(model, batch=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for static in (False, True):
            s = CachedSampler(model, 2, label, cond, static=static)
            assert s.step(0).dtype == torch.float32
    draw = dict(label=label, condition=cond)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [sample(model, 2, generator=torch.Generator().manual_seed(3), **kw, **draw)
                for kw in ({"compile": {"backend": "eager"}}, {})]
    assert torch.equal(runs[0], runs[1])


class StaticInputs:
    """A torch.compile backend that records, for each graph, its tensor inputs (by source name) with whether
    dynamo marked them as static addresses (what CUDA-graph trees neither copy nor re-record), and the inputs the
    graph writes in place."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        static, written = {}, set()
        for node in graph_module.graph.find_nodes(op="placeholder"):
            if isinstance(node.meta.get("example_value"), torch.Tensor):
                kind = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
                static[node._dynamo_source.name] = kind is not None
        for node in graph_module.graph.nodes:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("_"):
                target = node.args[0]
                if target.op == "placeholder":
                    written.add(target._dynamo_source.name)
        self.graphs.append((static, written))
        return graph_module.forward


@pytest.mark.parametrize("variant", ["rgb", "codes-class-cond-k3-heads2", "codes-cond-no-attn"])
def test_compiled_step_reads_every_weight_and_table_as_a_static_input(variant):
    """CUDA graphs copy every graph input that is not a static address into their own buffer at each replay: the
    compiled step and append must see all of the sampler's tensors as static, and write only to such inputs. The
    only others are the position and the appended raw values (a few bytes)."""
    model = make_model(variant, dtype=torch.float32)
    _, label, cond = make_inputs(model, batch=2)
    backend = StaticInputs()
    torch._dynamo.reset()
    sample(model, 2, label=label, condition=cond, compile={"backend": backend})
    assert len(backend.graphs) == 2
    (step, step_writes), (append, append_writes) = backend.graphs
    assert len(step) > 10 and append_writes
    for static, written in backend.graphs:
        dynamic = sorted(name for name, is_static in static.items() if not is_static)
        assert all(name in ("L['p']", "L['raw']") for name in dynamic), dynamic
        assert written and all(static[name] for name in written), written
