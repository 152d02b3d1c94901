"""Loss terms by name. Importing this package registers every built-in term."""
from kdistill.losses import features, logit_structure, logits, minillm, relations, taid  # noqa: F401  (registration side effect)
from kdistill.losses.base import LOSSES, LossTerm, TermParams, register_loss

__all__ = ["LOSSES", "LossTerm", "TermParams", "register_loss"]
