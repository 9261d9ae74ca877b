"""Errors raised by decoderscope. Every message names the offending value and what to do."""

from __future__ import annotations


class DecoderscopeError(Exception):
    """Base class: a model, checkpoint, data or argument that decoderscope cannot use."""


class DataError(DecoderscopeError):
    """The data given is empty, not finite, or of the wrong type or shape."""


class EncodeError(DecoderscopeError):
    """`encode(x)` did not return two finite tensors `(mu, logvar)` of equal shape."""


class LayerError(DecoderscopeError):
    """A layer name is unknown, a chosen layer never fired, fired twice, or gave no tensor."""


class DecoderError(DecoderscopeError):
    """The decoder raised while decoderscope was running it."""


class ArgumentError(DecoderscopeError):
    """An argument to `inspect` or the CLI is out of range."""


class CheckpointError(DecoderscopeError):
    """A checkpoint cannot be read, or does not fit the model."""
