"""The one exception type the pack raises for problems a user can fix in the workflow."""


class PerResError(ValueError):
    """A bad input or state, with a message that says what was wrong and how to fix it."""
