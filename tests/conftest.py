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
