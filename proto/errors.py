"""The project's one error tree.

Every error gpuattest raises on purpose derives from :class:`GpuattestError`, so callers
can catch the family or one precise member.
"""

from __future__ import annotations


class GpuattestError(Exception):
    """Base of every error gpuattest raises on purpose."""


class EnvelopeError(GpuattestError):
    """An envelope could not be trusted; nothing from it may be used."""


class MalformedError(EnvelopeError):
    """Bytes that do not parse as the message they claim to be."""


class SignatureError(EnvelopeError):
    """No signature from a trusted key verifies over the envelope."""


class UnknownKeyError(SignatureError):
    """No signature on the envelope names a key the verifier knows."""


class PayloadTypeError(EnvelopeError):
    """The envelope's payload type is not the one the caller expects."""


class LimitError(EnvelopeError):
    """A message exceeds one of the hard limits in :class:`proto.limits.WireLimits`."""


class KeyFileError(GpuattestError):
    """A key file is missing, malformed or readable by other users."""
