"""teesplit: Llama-family inference split between a trusted enclave and an untrusted GPU server.

`teesplit.Runner` is the Python entry point (teesplit/runner.py). It is imported on first use,
so a GPU server process, which imports `teesplit.gpu`, never loads the trusted side.
"""

__version__ = "0.1.0"
__all__ = ["Runner", "__version__"]


def __getattr__(name: str):
    if name == "Runner":
        from teesplit.runner import Runner

        return Runner
    raise AttributeError(f"module 'teesplit' has no attribute {name!r}")
