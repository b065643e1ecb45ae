"""lenssteer: steer the internal representations of causal LMs to make them better in more languages."""

__version__ = "0.1.0"
