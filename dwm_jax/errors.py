"""Errors shared by training and evaluation."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient, weight or feature became NaN or infinite."""
