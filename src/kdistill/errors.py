"""Errors a user can act on. The CLI prints their message and exits with code 2; anything else is a bug."""


class KdistillError(Exception):
    """Base for every error whose message tells the user what is wrong, where, and how to fix it."""


class ConfigError(KdistillError):
    """A recipe or command-line value is wrong (the message names the field path)."""


class DataError(KdistillError):
    """A data source is missing, unreadable or empty."""


class PairingError(KdistillError):
    """Teacher and student (or a loss and its taps) cannot be paired."""


class CheckpointError(KdistillError):
    """A checkpoint or run directory is corrupt, foreign, or does not match the recipe."""


class OutputError(KdistillError):
    """A finished result (the student's directory) could not be written, e.g. on a full disk."""


def did_you_mean(name, valid, cutoff: float = 0.5, spell=repr) -> str:
    """"; did you mean X?" for the closest of `valid` to a mistyped name (X as `spell` writes it), else ""."""
    import difflib

    valid = [str(v) for v in valid]
    # two letters swapped (`modle`) is the likeliest typo, though a shorter name can be closer by ratio (`mode`)
    swapped = [v for v in valid if len(v) == len(str(name)) and sorted(v) == sorted(str(name))
               and sum(a != b for a, b in zip(v, str(name))) == 2]
    close = swapped or difflib.get_close_matches(str(name), valid, n=1, cutoff=cutoff)
    return f"; did you mean {spell(close[0])}?" if close else ""


def article(word: str) -> str:
    """'an embedding', 'a classification': for messages that name a task or kind."""
    return f"{'an' if str(word)[:1].lower() in 'aeiou' else 'a'} {word}"
