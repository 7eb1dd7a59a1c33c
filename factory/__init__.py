"""certfleet factory: the private CA, device certificates, provisioning bundles.

Pure PKI: imports nothing else of certfleet's. Provisioning lives in ``factory.provision``
(``provision_batch``), CSR signing in ``factory.csr``, registration in ``factory.registration``.
"""

from factory.ca import CertificateAuthority, IssuedCertificate, RevokedEntry
from factory.errors import (
    CAError,
    CertfleetError,
    ConfigError,
    CSRError,
    FactoryError,
    IdentityError,
    ProvisionError,
    RegistrationError,
)
from factory.layout import DataLayout
from factory.profile import Identity, IdentityKind, read_identity, serial_hex

__all__ = [
    "CAError",
    "CSRError",
    "CertfleetError",
    "CertificateAuthority",
    "ConfigError",
    "DataLayout",
    "FactoryError",
    "Identity",
    "IdentityError",
    "IdentityKind",
    "IssuedCertificate",
    "ProvisionError",
    "RegistrationError",
    "RevokedEntry",
    "read_identity",
    "serial_hex",
]
