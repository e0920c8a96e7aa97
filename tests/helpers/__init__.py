"""Helpers shared by the test folders of every layer (pytest puts tests/ on sys.path: `from helpers.ports import ...`).

- `ports`: a free loopback TCP port.
- `postgres`: the PostgreSQL admin URL, throwaway databases (create, drop), the catalog backends to test.
- `processes`: the API and the worker as real subprocesses (start, wait until ready, stop).
"""
