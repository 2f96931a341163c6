"""The error hierarchy: every error mmcds raises on purpose is an ``MmcdsError``.

Callers pick the branch they can act on: an ``InputRejected`` is the sender's to fix (the message
names the input and the bound), an ``UpstreamUnavailable`` is worth retrying later, a
``DeliveryRejected`` needs an operator (resending the same bundle cannot help), a
``ModelIncompatible`` means the configured checkpoints do not belong together. The stdlib base
beside each (``ValueError``, ``RuntimeError``) keeps ``except ValueError`` callers working.
"""

from __future__ import annotations


class MmcdsError(Exception):
    """Root of every error mmcds raises on purpose."""


class ConfigurationError(MmcdsError, RuntimeError):
    """A setting, file or installed prerequisite is missing or wrong; the message says which."""


class InputRejected(MmcdsError, ValueError):
    """An input (note, image, lab, request) cannot be used; the message says what and why."""


class UpstreamError(MmcdsError, RuntimeError):
    """A server we depend on (FHIR, PACS) answered, but not with what we asked for."""


class UpstreamUnavailable(UpstreamError):
    """A server we depend on could not be reached, timed out or answered 5xx: retry later."""


class DeliveryRejected(MmcdsError):
    """The receiving server refused what we sent (4xx): resending the same bytes cannot help."""


class ModelIncompatible(MmcdsError, RuntimeError):
    """A checkpoint cannot be loaded, or does not fit the encoders it is combined with."""


class StorageError(MmcdsError, RuntimeError):
    """The database cannot be opened or used (bad URL, unreachable server)."""


class AuthError(MmcdsError):
    """A credential (hook JWT, backend-services token) is not acceptable; the message is for the
    log only, never for the caller."""
