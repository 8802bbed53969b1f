"""Family name -> model class; ``build_model(cfg)`` is how everything else builds a model.

Adding a family is one entry here, one in ``models.config.FAMILIES`` and one objective in
``models.objectives.objective_for``.
"""
from __future__ import annotations

from torch import nn

from bmray.models.families.bert import BertForPretraining, ElectraForPretraining
from bmray.models.config import FAMILIES, ModelConfig
from bmray.models.families.gpt import GPT
from bmray.models.families.t5 import T5
from bmray.models.typed_config import check_choice

MODEL_FAMILIES: dict[str, type[nn.Module]] = {
    "gpt": GPT,
    "bert": BertForPretraining,
    "electra": ElectraForPretraining,
    "t5": T5,
}
assert set(MODEL_FAMILIES) == set(FAMILIES), "registry and ModelConfig.family choices disagree"


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of ``cfg.family``."""
    check_choice("model.family", cfg.family, MODEL_FAMILIES)
    return MODEL_FAMILIES[cfg.family](cfg)
