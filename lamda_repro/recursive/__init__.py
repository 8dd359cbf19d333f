"""(Relaxed) Recursive Transformers: layer sharing, depth-wise LoRA, uptraining and evaluation.

Main entry points: ``convert_to_recursive`` (convert.py), ``relax_recursive`` (relax.py),
``save_recursive`` / ``load_recursive`` (convert.py), ``non_embedding_counts`` (counts.py),
``train_causal_lm`` (uptrain.py) and ``execute_run`` (runner.py, one configured run); early exit
(early_exit.py) and the depth-wise batching engine, schedulers and simulator (serving/).
"""

from lamda_repro.config import register_section_check
from lamda_repro.recursive.convert import (
    RecursionSpec,
    RecursiveConfigError,
    convert_to_recursive,
    load_recursive,
    save_recursive,
    truncate_layers,
)
from lamda_repro.recursive.counts import non_embedding_counts
from lamda_repro.recursive.relax import DepthLoRALinear, LoraSpec, relax_recursive


def _check_section(section, config):
    """Every check the workflow makes of the section: its own values, its serving block, and its
    references into the config's data and models sections (the shared pretraining stage)."""
    from lamda_repro.recursive.runner import resolve_section
    from lamda_repro.recursive.serving.config import resolve_serving

    resolved = resolve_section(section)
    resolve_serving(resolved)
    data = resolved["corpus"].get("data")
    if data and data not in config["data"]:
        raise RecursiveConfigError(f"recursive.corpus.data: unknown data set {data!r}")
    for name, entry in resolved["models"].items():
        if "model" in entry and config["models"].get(entry["model"], {}).get("source") != "build":
            raise RecursiveConfigError(
                f"recursive.models.{name}.model: {entry['model']!r} is not a models entry with source build"
            )


# The recursive stage owns the config's ``recursive:`` section: validate_config calls this.
register_section_check("recursive", _check_section)

__all__ = [
    "RecursionSpec",
    "RecursiveConfigError",
    "convert_to_recursive",
    "load_recursive",
    "save_recursive",
    "truncate_layers",
    "non_embedding_counts",
    "DepthLoRALinear",
    "LoraSpec",
    "relax_recursive",
]
