"""Where relying parties that are not ours find revocation data: the publication URL.

``certfleet ca init --publish-url http://host:port`` records one base URL in ``ca.json``;
every certificate minted afterwards carries the CRL Distribution Point ``<base>/crl.der``,
the Freshest CRL ``<base>/delta-crl.der`` (the delta CRL, RFC 5280 5.2.6) and the AIA OCSP
URL ``<base>/ocsp``, and every CRL the matching Issuing Distribution Point (EMQX's CRL check
needs both); every base CRL names the delta too. The registry's publication listener serves
those paths.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID

from fleetcore.errors import ConfigError

__all__ = [
    "CRL_PATH",
    "CRL_PEM_PATH",
    "DELTA_CRL_PATH",
    "DELTA_CRL_PEM_PATH",
    "OCSP_PATH",
    "check_publish_url",
    "crl_url",
    "delta_crl_url",
    "freshest_crl",
    "issuing_distribution_point",
    "leaf_publication_extensions",
    "ocsp_url",
]

CRL_PATH = "/crl.der"
CRL_PEM_PATH = "/crl.pem"
DELTA_CRL_PATH = "/delta-crl.der"
DELTA_CRL_PEM_PATH = "/delta-crl.pem"
OCSP_PATH = "/ocsp"


def check_publish_url(url: str) -> str:
    """The base URL without a trailing slash; ConfigError unless ``http://host[:port][/path]``.

    Plain HTTP on purpose: CRLs and OCSP answers are signed, and relying parties (OpenSSL,
    nginx, EMQX) fetch distribution points over HTTP without a trust store of their own.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"--publish-url {url!r} is not a plain http://host[:port][/path] URL "
            "(CRLs and OCSP answers are signed; relying parties fetch them over HTTP)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"--publish-url {url!r} has an invalid port") from None
    return url.rstrip("/")


def crl_url(base: str) -> str:
    return f"{base}{CRL_PATH}"


def delta_crl_url(base: str) -> str:
    return f"{base}{DELTA_CRL_PATH}"


def ocsp_url(base: str) -> str:
    return f"{base}{OCSP_PATH}"


def leaf_publication_extensions(base: str) -> list[x509.Extension[x509.ExtensionType]]:
    """CRL Distribution Point, Freshest CRL and AIA OCSP URL, as every leaf carries them."""
    cdp = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_url(base))],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )
    aia = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url(base))
            )
        ]
    )
    freshest = freshest_crl(base)
    return [
        x509.Extension(cdp.oid, False, cdp),
        x509.Extension(freshest.oid, False, freshest),
        x509.Extension(aia.oid, False, aia),
    ]


def freshest_crl(base: str) -> x509.FreshestCRL:
    """Where the delta CRL is (RFC 5280 5.2.6, non-critical): in leaves and base CRLs."""
    return x509.FreshestCRL(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(delta_crl_url(base))],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def issuing_distribution_point(base: str) -> x509.IssuingDistributionPoint:
    """The CRL's IDP: the same URL the certificates' distribution point names."""
    return x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(crl_url(base))],
        relative_name=None,
        only_contains_user_certs=False,
        only_contains_ca_certs=False,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )
