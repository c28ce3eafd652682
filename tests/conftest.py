import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(**kwargs) -> a checkpoint directory, built once per distinct set of arguments."""
    built: dict[str, Path] = {}

    def make(**kwargs) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
        return built[key]

    return make


@pytest.fixture
def canned(monkeypatch):
    """canned(text) makes every answer `text` (and records each prompt's constraint and the prompt)."""
    from qwenvl_cli.engine import Answer, Engine

    calls = []

    def install(text: str, finish_reason: str = "stop"):
        def answer(self, prompt, params, on_text=None, constraint=None):
            calls.append(constraint)
            if on_text:
                on_text(text)
            return Answer(text, prompt.length, 7, finish_reason, self.name)

        monkeypatch.setattr(Engine, "answer", answer)
        return calls

    return install


@pytest.fixture(params=["native", "torch"])
def decode_kernels(request, monkeypatch):
    """Each CPU decode backend in turn: the native kernels (skipped only where this machine cannot build
    them, with the reason), then torch's (oneDNN-packed floats, torch's int8 kernel), forced by taking the
    native ones away."""
    from qwenvl_cli.model import native

    if request.param == "torch":
        monkeypatch.setattr(native, "status", lambda: native.Status(None, "torch's kernels (test)"))
    elif native.kernels() is None:
        status = native.status()
        if status.broken and "no C compiler" not in status.reason:
            pytest.fail(status.reason)  # a capable machine whose build or check failed
        pytest.skip(f"native kernels unavailable here: {status.reason}")
    return request.param
