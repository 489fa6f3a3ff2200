"""The MQTT 5 side of the codec: every packet's encoder and decoder, and the decode loop.

The encoders are in :mod:`._v5_encode` (:data:`ENCODERS`), the decoders and the decode loop
in :mod:`._v5_decode` (:func:`decode_all`); this module is what :mod:`codec` imports.

The structure mirrors the 3.1.1 code in :mod:`codec` (same fixed-header table, same inline
PUBLISH and acknowledgement fast paths, same packet-size check before any body is buffered),
with what MQTT 5 adds: property blocks, reason codes (validated per packet type, §2.4), the
AUTH packet, subscription options, and the shortest-form rule for variable byte integers
(MQTT-1.5.5-1), which 3.1.1 did not have.
"""

from mqtt_persist.protocol._v5_decode import decode_all
from mqtt_persist.protocol._v5_encode import ENCODERS

__all__ = ["ENCODERS", "decode_all"]
