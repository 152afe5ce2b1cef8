"""attestmesh: verify TEE attestation evidence on a NATS mesh, then release secrets."""

__version__ = "0.1.0"
