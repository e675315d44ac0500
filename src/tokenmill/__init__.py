"""tokenmill: data-efficient language-model pretraining, from raw corpus to evaluated model."""

__version__ = "0.1.0"


class TokenmillError(Exception):
    """An error in user input (recipe, data, paths) with a message that says what to fix.

    The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
    """
