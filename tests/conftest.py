"""Shared test fixtures: tiny model configs and the optional real data in ../shared/data."""
import os
from pathlib import Path

import pytest
import torch

from vqprior.config import model_config_from_preset
from vqprior.models.pixelsnail import PixelSNAIL

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real CIFAR-10 / MNIST npz folder when present (never required)."""
    for candidate in (os.environ.get("VQPRIOR_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def markdown_pages() -> list[Path]:
    """Every Markdown page of the repository (not of the virtual environment or run folders)."""
    pages = [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), *(REPO / "checkpoints").glob("*.md"),
             *(REPO / "scripts").rglob("*.md")]
    return sorted(p for p in pages if p.is_file())


def load_script(name: str, folder: str = "scripts"):
    """A module of scripts/ (or bench/: not packages), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> PixelSNAIL:
    """A tiny PixelSNAIL in eval mode with non-trivial weight-norm scales and biases."""
    torch.manual_seed(seed)
    defaults = dict(height=5, width=5)
    defaults.update(overrides)
    model = PixelSNAIL(model_config_from_preset("tiny", **defaults)).to(dtype).eval()
    return scramble(model, "class_embedding")


def scramble(model: PixelSNAIL, embeddings: str) -> PixelSNAIL:
    """Weight-norm scales away from 1 and non-zero biases and ``embeddings`` (random), so every parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or embeddings in name:
                p.normal_(0, 0.3)
    return model


def pixel_model(channels=3, seed=0, dtype=torch.float32, **kw):
    """A tiny float32 pixel model on 6x5 images (the compression tests' model)."""
    return tiny_model(seed, dtype, head="pixels", channels=channels, height=6, width=5, **kw)


def images_for(model, n, seed=1, smooth=True):
    """Test images: smooth ramps plus noise (a model codes them in fewer than 8 bits/dim) or uniform noise."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    if not smooth:
        return torch.randint(0, 256, (n, c.channels, c.height, c.width), generator=g, dtype=torch.uint8)
    base = torch.linspace(0, 255, c.width).expand(n, c.channels, c.height, c.width)
    noise = torch.randint(-20, 21, base.shape, generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


# ---- tiny random models of every variant, for the exactness tests of the samplers ------------------------------
H, W = 5, 6  # not square: a swapped row/column index cannot pass
COND = dict(cond_num_codes=5, cond_height=2, cond_width=3)
VARIANTS = {
    "rgb": dict(head="pixels", channels=3),
    "gray-k3-heads2": dict(head="pixels", channels=1, kernel_size=3, attn_heads=2),
    "gray-no-attn-class": dict(head="pixels", channels=1, attention=False, num_classes=3),
    "codes": dict(head="codes", num_codes=7),
    "codes-class-cond-k3-heads2": dict(head="codes", num_codes=7, num_classes=3, kernel_size=3, attn_heads=2, **COND),
    "codes-cond-no-attn": dict(head="codes", num_codes=7, attention=False, **COND),
}


def make_model(variant: str, dtype=torch.float64, seed: int = 0, **overrides) -> PixelSNAIL:
    """A tiny random model whose every parameter matters: unit-scale weight-normed rows (weight_g away from |v|, so
    weight() must be computed as the model does), non-zero biases and class biases."""
    torch.manual_seed(seed)
    model = PixelSNAIL(model_config_from_preset("tiny", height=H, width=W, **VARIANTS[variant], **overrides))
    return scramble(model, "embedding").to(dtype).eval()


def make_inputs(model, batch: int, seed: int = 1):
    """Random data, labels and condition codes that fit ``model``."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    if c.head == "pixels":
        x = torch.randint(0, 256, (batch, c.channels, H, W), generator=g, dtype=torch.uint8)
    else:
        x = torch.randint(0, c.num_codes, (batch, H, W), generator=g)
    label = torch.randint(0, c.num_classes, (batch,), generator=g) if c.num_classes else None
    cond = torch.randint(0, c.cond_num_codes, (batch, c.cond_height, c.cond_width), generator=g) \
        if c.cond_num_codes else None
    return x, label, cond


def value_at(x, p):
    r, c = divmod(p, W)
    return x[:, :, r, c] if x.dim() == 4 else x[:, r, c]


def max_step_error(model, start: int, static: bool = False) -> float:
    """Largest |cached step params - full forward params on the same prefix| over the positions >= start of random
    data (the forward sees the data at positions < p and zeros after, as naive sampling does)."""
    x, label, cond = make_inputs(model, batch=3)
    from vqprior.sampling.sampler import CachedSampler

    with torch.no_grad():
        sampler = CachedSampler(model, 3, label, cond, static=static)
        sampler.prefill(x, start)
        error = 0.0
        for p in range(start, H * W):
            params = sampler.step(p)
            assert params.shape == (3, model.config.out_channels)
            known = x.clone()
            known.view(3, -1, H * W)[:, :, p:] = 0
            full = model(known, label=label, condition=cond)[:, :, p // W, p % W]
            error = max(error, (params - full).abs().max().item())
            sampler.append(p, value_at(x, p))
    return error


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models: thread start-up costs more than it saves, and two busy threads on a shared 2-core machine are
    many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_unchanged(root: Path, before: dict[str, tuple], what: str) -> None:
    """The session's shared artefacts are read by many tests: one that writes must work on a copy."""
    from cli_support import snapshot

    assert snapshot(root) == before, f"a test changed the shared {what} under {root}: work on a copy"


@pytest.fixture(scope="session")
def pixel_run(tmp_path_factory):
    """A tiny pixel run (tests/cli_support.py ``build_pixel_run``), built once for the session; copy it to change
    it (checked at the end of the session)."""
    from cli_support import build_pixel_run, snapshot

    root = tmp_path_factory.mktemp("pixel-run")
    run = build_pixel_run(root / "run")
    before = snapshot(root)
    yield run
    assert_unchanged(root, before, "pixel run")


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory):
    """A tiny class-conditional pixel run (10 classes, no null class), built once for the session; copy it to
    change it."""
    from cli_support import build_pixel_run, snapshot

    root = tmp_path_factory.mktemp("conditional-run")
    run = build_pixel_run(root / "run", "--class-conditional", steps=1)
    before = snapshot(root)
    yield run
    assert_unchanged(root, before, "class-conditional pixel run")


@pytest.fixture(scope="session")
def prior_pipeline(tmp_path_factory):
    """The tiny two-level VQ-VAE pipeline (tests/cli_support.py ``build_prior_pipeline``), built once for the
    session; copy what a test changes (checked at the end of the session)."""
    from cli_support import build_prior_pipeline, snapshot

    root = tmp_path_factory.mktemp("priors")
    pipeline = build_prior_pipeline(root)
    before = snapshot(root)
    yield pipeline
    assert_unchanged(root, before, "prior pipeline")


@pytest.fixture(scope="session")
def bad_input_artefacts(tmp_path_factory, pixel_run, prior_pipeline):
    """The tiny real artefacts the bad-input tables (tests/test_bad_inputs_*.py) point at, built once."""
    from bad_inputs import build_artefacts

    return build_artefacts(tmp_path_factory.mktemp("artefacts"), pixel_run, prior_pipeline)


@pytest.fixture(scope="session")
def levels_pipeline(tmp_path_factory):
    """A tiny 3-level VQ-VAE pipeline (tests/cli_support.py ``build_levels_pipeline``), built once."""
    from cli_support import build_levels_pipeline

    return build_levels_pipeline(tmp_path_factory.mktemp("levels"))


# ---- tiny training runs ------------------------------------------------------------------------------------------
class ImageSet(torch.utils.data.Dataset):
    """Random but fixed 8x8 RGB images with labels."""

    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def tiny_pixel_task(**overrides):
    from vqprior.config import DataConfig
    from vqprior.training.pixel_task import PixelTask

    cfg = model_config_from_preset("tiny", **{"height": 8, "width": 8, "dropout": 0.2, **overrides})
    return PixelTask(cfg, DataConfig(dataset="synthetic"))


def tiny_train_config(steps, **kw):
    from vqprior.config import TrainConfig

    base = dict(steps=steps, batch_size=4, eval_every=1000, sample_every=1000, checkpoint_every=3, num_samples=2,
                seed=7, ema=0.9)
    base.update(kw)
    return TrainConfig(**base)


def train_tiny(out, steps, checkpoint=None, task=None, **kw):
    """Train a tiny pixel model on ``ImageSet`` for ``steps`` steps into ``out`` (TrainConfig fields in ``kw``)."""
    from vqprior.training.loop import train

    return train(task or tiny_pixel_task(), ImageSet(), ImageSet(8, seed=1), tiny_train_config(steps, **kw), out,
                 checkpoint=checkpoint, progress=False)


class NaNTask:
    """Wraps a task so that the loss becomes NaN from a given step on."""

    def __init__(self, task, bad_from):
        self.task, self.bad_from, self.calls = task, bad_from, 0
        self.kind = task.kind

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        self.calls += 1
        loss, metrics = self.task.loss(model, batch)
        return (loss * float("nan") if self.calls > self.bad_from else loss), metrics


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs minutes (inductor kernels); `make test` leaves it to "
                                       "`make test-slow`, which CI runs too")
