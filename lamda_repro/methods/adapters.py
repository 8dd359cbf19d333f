"""Loading saved peft adapters (LaMDA included) onto a base model.

peft resolves a saved adapter's ``peft_type`` through its own registry, which knows ``LAMDA``
only after ``lamda_repro.methods.lamda`` has been imported; otherwise it fails with a bare
``KeyError: 'LAMDA'``. ``load_adapter`` reads ``adapter_config.json`` first and registers LaMDA
itself; ``check_adapter_loadable`` turns an unknown type into a one-line error that says what to
import.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
# Adapter types defined by this suite: peft_type -> the module whose import registers it with peft.
SUITE_ADAPTER_MODULES = {"LAMDA": "lamda_repro.methods.lamda"}


class AdapterTypeError(ValueError):
    """A saved adapter cannot be loaded: no config, or a type peft does not know."""


def saved_adapter_type(path: str | Path) -> str:
    """The ``peft_type`` written in ``path/adapter_config.json``."""
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterTypeError(f"no {ADAPTER_CONFIG} in {path}: not a saved peft adapter")
    try:
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise AdapterTypeError(f"{config_file} is not a JSON object: {exc}") from None
    if not isinstance(peft_type, str) or not peft_type:
        raise AdapterTypeError(f"{config_file} names no peft_type")
    return peft_type


def _peft_knows(peft_type: str) -> bool:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return peft_type in PEFT_TYPE_TO_CONFIG_MAPPING


def check_adapter_loadable(path: str | Path) -> str:
    """Return the saved adapter's type, or raise one line saying what peft is missing."""
    peft_type = saved_adapter_type(path)
    if _peft_knows(peft_type):
        return peft_type
    module = SUITE_ADAPTER_MODULES.get(peft_type)
    if module is not None:
        raise AdapterTypeError(
            f"{path} holds a {peft_type} adapter, which peft knows only after `import {module}` "
            f"(or load it with lamda_repro.methods.adapters.load_adapter)"
        )
    raise AdapterTypeError(f"{path} holds a {peft_type!r} adapter, a type this peft version does not know")


def load_adapter(base_model: nn.Module, path: str | Path, is_trainable: bool = False, **kwargs: Any):
    """``PeftModel.from_pretrained(base_model, path)``, registering the suite's adapter types first."""
    from peft import PeftModel

    peft_type = saved_adapter_type(path)
    if not _peft_knows(peft_type) and peft_type in SUITE_ADAPTER_MODULES:
        importlib.import_module(SUITE_ADAPTER_MODULES[peft_type])
    check_adapter_loadable(path)
    return PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable, **kwargs)
