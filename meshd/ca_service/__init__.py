"""The mesh CA as a service: enrollment with one-time tokens, CSR signing over mTLS, rotation.

See docs/ca.md, "The CA service". Layout: `token` (pure: mint, verify, pin), `wire` (pure framing),
`store` (the CA folder's state file), `authority` (who may get which certificate), `rotation`,
`service` (the trio endpoints on the CA host), `client` (enrollment and the enrolled CertSource).
"""
