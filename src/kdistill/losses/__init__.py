"""Loss terms by name. Importing this package registers every built-in term."""
from kdistill.losses import cka, features, logit_structure, logits, minillm, relations, taid, vision  # noqa: F401  (registration side effect)
from kdistill.losses import deit, text_alignment  # noqa: F401  (vision: DeiT, GPT4Image)
from kdistill.losses.base import LOSSES, LossTerm, TermParams, register_loss

__all__ = ["LOSSES", "LossTerm", "TermParams", "register_loss"]
