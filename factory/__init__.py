"""certfleet factory: the manufacturing line. The private CA, minting, provisioning bundles.

Builds on ``fleetcore`` (identity, errors, data layout, settings loader) and imports no other
part. Provisioning lives in ``factory.provision`` (``provision_batch``), CSR signing in
``factory.csr``, registration in ``factory.registration``.
"""

from factory.ca import CertificateAuthority, IssuedCertificate, RevokedEntry
from factory.errors import CAError, CSRError, FactoryError, ProvisionError, RegistrationError

__all__ = [
    "CAError",
    "CSRError",
    "CertificateAuthority",
    "FactoryError",
    "IssuedCertificate",
    "ProvisionError",
    "RegistrationError",
    "RevokedEntry",
]
