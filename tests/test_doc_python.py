"""The Python examples of the README and docs/usage.md run as written, from the repository root, each block in a
fresh namespace, and compute what their comments say."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import REPO

PAGES = [REPO / "README.md", REPO / "docs" / "usage.md"]
BLOCKS = [(page, block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)]


def test_the_pages_show_python():
    assert {page.name for page, _ in BLOCKS} == {"README.md", "usage.md"} and len(BLOCKS) >= 4


@pytest.mark.parametrize("page,block", BLOCKS, ids=[f"{p.name}:{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_python_example_runs(page, block, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(block, f"{page.name} example", "exec"), namespace)  # noqa: S102 - our own documentation
    if "bits_per_dim" in namespace:  # a pixel model's per-image bits/dim: CIFAR-10 samples score 2 to 6
        assert namespace["bits_per_dim"].shape == (4,) and 2 < float(namespace["bits_per_dim"].mean()) < 6
    if "pictures" in namespace:
        assert namespace["pictures"].shape == (2, 3, 32, 32) and namespace["pictures"].dtype == torch.uint8
    if "bits_per_image" in namespace:  # a real test image's codes: 64 top and 256 bottom codes, 9 bits each at most
        assert 0 < namespace["bits_per_image"] < (64 + 256) * 9
