"""EST (RFC 7030 with the RFC 8951 clarifications) and zero-touch claim enrollment.

- :mod:`registry.est.models`: the claim, allow-list and enrollment-secret tables;
- :mod:`registry.est.wire`: base64 bodies, PKCS#7 certs-only, the CSR attributes;
- :mod:`registry.est.enroll`: first enrollment (claim or one-time secret) and re-enrollment;
- :mod:`registry.est.routes`: ``/.well-known/est/[<label>/]`` on the registry's listener.
"""
