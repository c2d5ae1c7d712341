"""`teesplit bench`: the benchmark, a leaf of the package that nothing in the library imports.

bench/run.py is the command (`teesplit bench ...`: options, the run, the report), bench/common.py
the measuring pieces it and its sections share, bench/sections/ the sections in their own
modules.
"""
