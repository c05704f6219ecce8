import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="session")
def tokenizer():
    from llama_pkg.tokenizer import Tokenizer

    return Tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def test_model(tmp_path_factory):
    """The tiny random Llama with the real Llama 2 tokenizer, built once per session."""
    import make_test_model

    return make_test_model.build(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def engine(test_model):
    from llama_pkg.engine import Engine

    return Engine.load(str(test_model))


def run(engine, **inputs):
    """One prediction through the engine: (chunks, metrics)."""
    from llama_pkg import runtime

    metrics = {}
    chunks = list(runtime.predict(engine, inputs, metrics.__setitem__))
    return chunks, metrics
