"""Text data: built-in offline corpora, recipe data sources, and collators.

`collate` needs torch, so it is imported on first use: listing corpora or validating a recipe
stays fast.
"""
from kdistill.data.corpora import CORPORA, load_corpus, split_of
from kdistill.data.sources import label_names, load_records

__all__ = ["CORPORA", "load_corpus", "split_of", "label_names", "load_records",
           "TextCollator", "mask_tokens"]


def __getattr__(name: str):
    if name in ("TextCollator", "mask_tokens"):
        from kdistill.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'kdistill.data' has no attribute {name!r}")
