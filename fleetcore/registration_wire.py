"""Device registration over HTTPS (``POST /api/v1/devices``): what both ends must agree on.

The factory's registration client (``factory.registration``) cuts a batch into calls of at
most :data:`MAX_BATCH` devices; the registry (``registry.models``) refuses a larger call.
"""

from __future__ import annotations

__all__ = ["MAX_BATCH"]

#: Devices per registration call (one transaction: all or nothing).
MAX_BATCH = 1000
