"""A composed config pickles (multiprocessing, submitit, the test processes' shared compositions) and comes back
with its schema: typed choices and unknown keys are still refused. A process that has not built a component's
schema yet builds it when it unpickles a config holding one."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from archifactory.config.compose import compose

OVERRIDES = ["mixin=mamba2", "ffn=moe", "trainer.optimizer=muon", "model.hidden_size=48"]


def test_a_composed_config_pickles_with_its_schema() -> None:
    cfg = compose(OVERRIDES)
    back = pickle.loads(pickle.dumps(cfg))
    assert OmegaConf.to_container(back) == OmegaConf.to_container(cfg)
    assert OmegaConf.get_type(back.mixin).__name__ == "mixin_mamba2_schema" and OmegaConf.is_struct(back)
    with pytest.raises(ValidationError, match="adamx"):
        back.trainer.optimizer = "adamx"
    with pytest.raises(ConfigAttributeError):
        back.mixin.no_such_option = 1


def test_a_fresh_process_builds_the_schemas_it_unpickles() -> None:
    script = (
        "import pickle, sys\n"
        "from omegaconf import OmegaConf\n"
        "cfg = pickle.loads(sys.stdin.buffer.read())\n"
        "print(OmegaConf.get_type(cfg.mixin).__name__, OmegaConf.get_type(cfg.ffn).__name__)\n"
        "try:\n"
        "    cfg.mixin.d_state = 'wide'\n"
        "except Exception as error:\n"
        "    print(type(error).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=pickle.dumps(compose(OVERRIDES)),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["mixin_mamba2_schema", "ffn_moe_schema", "ValidationError"]
