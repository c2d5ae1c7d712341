"""The UNTRUSTED GPU server: weights, operations, the ZeroMQ loop. torch lives here only."""
