"""Fault scenarios shared by the fault tests (tests/test_faults_*.py) and
benchmarks/fault_matrix.py.

Each ``run_*`` function drives the library through its public API against a real mosquitto,
counts with an independent paho subscriber and returns :class:`~tests.support.tally.FaultFigures`
(plus what is particular to the fault in ``notes``). The tests run them small and assert; the
matrix runs them large and prints the table in docs/reliability.md.
"""
