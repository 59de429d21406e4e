"""Errors raised by llmpatch. Every message names the parameter at fault and what is allowed."""


class LlmpatchError(ValueError):
    """Base class: bad input that llmpatch refused before touching the model."""


class UnsupportedModelError(LlmpatchError):
    """The model's architecture has no adapter."""


class ParameterError(LlmpatchError):
    """A method parameter or API argument has the wrong type or value."""


class PlanError(LlmpatchError):
    """A plan file is malformed, of an unknown schema, or made for another model."""


class PatchStateError(LlmpatchError):
    """Double apply, remove twice, or attention called on a module that is not patched."""


class ModelFetchError(LlmpatchError):
    """An unknown model alias, or a download that failed or did not match its sha256."""
