"""Shared test setup: the fixtures in ../shared (or $SFT_COLLATE_SHARED) and the devices present."""

import json
import os
import pathlib

import pytest

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[3]


def shared_dir():
    """The shared fixtures, or a skip saying why (a failure under CI=true, where they must be present)."""
    path = pathlib.Path(os.environ.get("SFT_COLLATE_SHARED", ROOT.parent / "shared"))
    if (path / "fixtures").is_dir():
        return path
    message = f"shared fixtures not found at {path} (set SFT_COLLATE_SHARED)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " and CI=true requires them")
    pytest.skip(message)


@pytest.fixture
def shared():
    return shared_dir()


@pytest.fixture
def fixture_json(shared):
    def load(rel):
        return json.loads((shared / "fixtures" / rel).read_text())

    return load


@pytest.fixture
def qwen2_path(shared):
    return str(shared / "fixtures/qwen2/tokenizer.json")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
