"""LamdaConfig: the peft-style configuration of a LaMDA / LaMDA++ adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from lamda_repro.methods.lamda.peft_type import LAMDA_PEFT_TYPE

INIT_CHOICES = ("svd", "svd_residual", "svd_lowrank", "reference_code")


class LamdaConfigError(ValueError):
    """A LamdaConfig field has an invalid value."""


@dataclass
class LamdaConfig(PeftConfig):
    """Configuration of a LaMDA adapter: y = W x + (alpha / r) * B (S (A x)).

    A (r x d_in) is always frozen, S (r x r) always trains, and B (d_out x r) trains until its
    columns are frozen one by one (largest singular direction first) over the first
    ``freeze_fraction`` of the optimizer steps.
    """

    r: int = field(default=8, metadata={"help": "Rank of the adapter (size of the square matrix S)."})
    lora_alpha: float = field(
        default=8.0,
        metadata={"help": "Scaling numerator: the adapter output is multiplied by lora_alpha / r."},
    )
    lamda_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout probability on the adapter input. With dropout > 0 autograd keeps a "
            "d_in-sized mask, "
            "so the activation saving of LaMDA is smallest at 0.0."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex of the nn.Linear modules to adapt, e.g. ['query', "
            "'value']. "
            "None picks peft's LoRA defaults for the model type."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt."}
    )
    init: str = field(
        default="svd",
        metadata={
            "help": "Initialisation. 'svd': A = V_r^T, B = U_r, S = 0 (W unchanged). 'svd_residual': as "
            "'svd' but "
            "S = Sigma_r / scaling and W <- W - U_r Sigma_r V_r^T. 'svd_lowrank': as 'svd' with a randomized "
            "truncated SVD (fast on large matrices, approximate). 'reference_code': reproduces the public "
            "reference "
            "code (A Kaiming-uniform, B = 0, S nn.Linear default init, and its gradient-zeroing freeze rule)."
        },
    )
    freeze_fraction: float = field(
        default=0.3,
        metadata={
            "help": "Fraction of the optimizer steps over which B is frozen column by column; component k "
            "is frozen "
            "from step floor(k * freeze_fraction * total_steps / r). 0 freezes B before the first step."
        },
    )
    total_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number of optimizer steps of the run, used by the freeze schedule. None: taken from the "
            "trainer state (max_steps) when training starts."
        },
    )
    svd_niter: int = field(
        default=4, metadata={"help": "Power iterations of the randomized SVD used by init='svd_lowrank'."}
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-module ranks, {module name or regex: rank}, as in peft's LoRA (LaMDA++ fills it "
            "from "
            "allocate_ranks)."
        },
    )
    alpha_pattern: dict = field(
        default_factory=dict, metadata={"help": "Per-module lora_alpha, {module name or regex: alpha}."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules besides the adapters that are fully trained and saved, e.g. ['classifier'] "
            "for a "
            "sequence-classification head."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (as in peft's LoRA)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform."}
    )
    bias: str = field(default="none", metadata={"help": "Bias training: only 'none' is supported."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = LAMDA_PEFT_TYPE
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        self.validate()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load a saved config, marked so that the adapter built from it skips the SVD init.

        peft builds the adapter from this config and then loads the saved A, S and B over it, so
        decomposing every weight first would be wasted (hours for a 7B model on CPU). Only
        ``init='svd_residual'`` still decomposes: the residual W - U_r Sigma_r V_r^T is not saved.
        The mark is an attribute, not a field: it is never written to adapter_config.json.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.loading_saved_weights = True
        return config

    def validate(self) -> None:
        """Raise LamdaConfigError naming the first invalid field."""
        if not isinstance(self.r, int) or self.r <= 0:
            raise LamdaConfigError(f"LamdaConfig.r must be a positive integer, got {self.r!r}")
        if self.init not in INIT_CHOICES:
            raise LamdaConfigError(f"LamdaConfig.init must be one of {INIT_CHOICES}, got {self.init!r}")
        if not 0.0 <= float(self.freeze_fraction) <= 1.0:
            raise LamdaConfigError(
                f"LamdaConfig.freeze_fraction must be in [0, 1], got {self.freeze_fraction!r}"
            )
        if not 0.0 <= float(self.lamda_dropout) < 1.0:
            raise LamdaConfigError(f"LamdaConfig.lamda_dropout must be in [0, 1), got {self.lamda_dropout!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 0):
            raise LamdaConfigError(
                f"LamdaConfig.total_steps must be a non-negative integer, got {self.total_steps!r}"
            )
        if self.bias != "none":
            raise LamdaConfigError(f"LamdaConfig.bias must be 'none', got {self.bias!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise LamdaConfigError(
                    f"LamdaConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}"
                )
        if self.layers_pattern and self.layers_to_transform is None:
            raise LamdaConfigError("LamdaConfig.layers_pattern needs layers_to_transform")
