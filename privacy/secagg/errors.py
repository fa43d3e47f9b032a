"""The exception tree of secure aggregation.

Every error a session raises is a :class:`SecAggError`, so an adapter can turn any failure on one
message into an error reply instead of crashing the node. The subclasses say who is at fault:
the round's parameters, the site's own update, the message flow, a coordinator request that
would leak an input, or a round that cannot finish.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConflictingUnmaskRequest",
    "IdentityError",
    "InputError",
    "InputRangeError",
    "ModulusOverflowError",
    "NotSurvivorError",
    "OverlappingSetsError",
    "PeerAuthenticationError",
    "ProtocolError",
    "RequestRefused",
    "RoundAborted",
    "SecAggError",
    "ShareDecryptionError",
    "ShareReconstructionError",
    "TooFewSurvivorsError",
    "UnknownPeerError",
]


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class ConfigurationError(SecAggError, ValueError):
    """The round parameters cannot give a correct or private round."""


class ModulusOverflowError(ConfigurationError):
    """The modulus leaves no room for the sum of all weighted, quantised inputs."""


class IdentityError(ConfigurationError):
    """The site's identity key, roster or CA certificate is missing, unusable or inconsistent."""


class InputError(SecAggError, ValueError):
    """The site's update does not match the round (names, shapes, dtype, weight)."""


class InputRangeError(InputError):
    """A value or weight lies outside the range the round can represent exactly."""


class ProtocolError(SecAggError):
    """A message arrived out of order, belongs to another round or node, or is malformed."""


class ShareDecryptionError(ProtocolError):
    """An encrypted share failed authentication (tampered, replayed or misaddressed)."""


class ShareReconstructionError(SecAggError):
    """Shamir shares are too few or inconsistent to reconstruct a secret."""


class RequestRefused(SecAggError):
    """A client refuses a coordinator request that could reveal an individual input."""


class PeerAuthenticationError(RequestRefused):
    """A peer's round keys are not authenticated by this site's roster; nothing was shared.

    The message names the cause: a bad signature, a signer not in the roster, or a roster
    mismatch (two participants with one identity, this site's identity claimed by another node,
    more participants than roster sites).
    """


class OverlappingSetsError(RequestRefused):
    """The unmask request lists a node both as survivor and as dropped."""


class UnknownPeerError(RequestRefused):
    """The unmask request names a node that is not one of this client's share-holding peers."""


class NotSurvivorError(RequestRefused):
    """The unmask request does not list the client itself among the survivors."""


class TooFewSurvivorsError(RequestRefused):
    """The unmask request lists fewer survivors than the threshold."""


class ConflictingUnmaskRequest(RequestRefused):
    """A request contradicts what this client already released in the round.

    Releasing both the self-mask share and the mask-key share of one peer would let the
    coordinator remove every mask from that peer's input.
    """


class RoundAborted(SecAggError):
    """The server cannot complete the round; no aggregate and no individual input is revealed."""
