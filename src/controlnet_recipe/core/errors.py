"""Failures a user causes and can fix. The command line prints them as one line, with no
traceback; any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class RecipeError(Exception):
    """An expected failure: the message is one line naming the file or key and what was expected."""


class MissingInput(RecipeError, FileNotFoundError):
    """Something a stage needs is not there: an earlier stage's output, a model, a data folder."""


class BadInput(RecipeError, ValueError):
    """An input is there but is not what was expected."""
