"""teesplit: Llama-family inference split between a trusted enclave and an untrusted GPU server."""

__version__ = "0.1.0"
