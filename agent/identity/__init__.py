"""Workload identity: SPIFFE IDs, the mesh CA, the CA client and the certificate manager.

Modules: ``spiffe`` (IDs), ``svid`` (certificates and their checks), ``ca``
(signing), ``server`` / ``serve_ca`` (the CA over gRPC), ``client`` (CA client),
``manager`` (per-identity certificates, renewal, TLS contexts), ``tls`` (mTLS
contexts and the peer's identity). Only ``server``, ``serve_ca`` and
``client`` import grpc.
"""
