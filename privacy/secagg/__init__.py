"""SecAgg+ secure aggregation (Bell et al., CCS 2020) as framework-free state machines.

A round runs in four client messages: advertise keys, share keys, masked input, unmask. The
coordinator learns only the weighted sum of the inputs of the sites that completed masking,
and nothing if the round aborts. See :mod:`.client` for the threat model.

Differences from Flower's SecAgg+ (flwr 1.42): round keys are signed with each site's identity
key and checked against a roster every site holds (:mod:`.identity`); masks come from
AES-256-CTR keyed with the full 256-bit secret (not a 32-bit seed of a Mersenne Twister);
clients refuse overlapping survivor and dropped sets and never release both shares of one
site; a site lost before key setup is dropped instead of aborting the round; values outside
the clipping range raise instead of being clipped; the modulus is checked against overflow
before the round starts.
"""

from .client import ClientSession
from .driver import InMemoryRound, run_round_in_memory, simulated_consortium
from .errors import (
    ConfigurationError,
    ConflictingUnmaskRequest,
    IdentityError,
    InputError,
    InputRangeError,
    ModulusOverflowError,
    NotSurvivorError,
    OverlappingSetsError,
    PeerAuthenticationError,
    ProtocolError,
    RequestRefused,
    RoundAborted,
    SecAggError,
    ShareDecryptionError,
    ShareReconstructionError,
    TooFewSurvivorsError,
    UnknownPeerError,
)
from .graph import default_degree, neighbour_graph
from .identity import Roster, SiteIdentity, load_identity_key, load_roster
from .ids import NodeId
from .messages import (
    KeyAdvertisement,
    KeyBroadcast,
    MaskedInput,
    Message,
    ShareDelivery,
    ShareKeys,
    ShareKind,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    payload_nbytes,
)
from .quantise import quantisation_bound, required_modulus_bits
from .round_setup import RoundSetup
from .server import AggregateResult, ServerSession

__all__ = [
    "AggregateResult",
    "ClientSession",
    "ConfigurationError",
    "ConflictingUnmaskRequest",
    "IdentityError",
    "InMemoryRound",
    "InputError",
    "InputRangeError",
    "KeyAdvertisement",
    "KeyBroadcast",
    "MaskedInput",
    "Message",
    "ModulusOverflowError",
    "NodeId",
    "NotSurvivorError",
    "OverlappingSetsError",
    "PeerAuthenticationError",
    "ProtocolError",
    "RequestRefused",
    "RoundAborted",
    "RoundSetup",
    "Roster",
    "SecAggError",
    "ServerSession",
    "ShareDecryptionError",
    "ShareDelivery",
    "ShareKeys",
    "ShareKind",
    "ShareReconstructionError",
    "SiteIdentity",
    "Stage",
    "TooFewSurvivorsError",
    "UnknownPeerError",
    "UnmaskRequest",
    "UnmaskResponse",
    "default_degree",
    "load_identity_key",
    "load_roster",
    "neighbour_graph",
    "payload_nbytes",
    "quantisation_bound",
    "required_modulus_bits",
    "run_round_in_memory",
    "simulated_consortium",
]
