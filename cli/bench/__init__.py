"""``dt bench``: reproducible benchmarks of the services against their floors (SPEC §10).

Every benchmark measures the real service in its own process, driven over
real gRPC by a load generator in another process, and in the same run the
same operation done by the bare libraries (the *floor*), so that the cost of
the service logic reads as a ratio rather than as an absolute number that
only means something on the machine it was taken on.

Modules:

* :mod:`.all` - ``dt bench all``: every benchmark, then ``BENCHMARKS.md``
  (rendered by :mod:`.markdown`, a pure function of the results);
* :mod:`.mixed` - ``dt bench mixed``: 2 GCs, 3 MCs, 2 MHs under a steady
  mix of first joins and re-joins (the join bench's stack and generator);
* :mod:`.join`, :mod:`.assign` - ``dt bench join`` / ``dt bench assign``, with
  their load generators (:mod:`.join_loadgen`, :mod:`.assign_loadgen`) and
  floors (:mod:`.join_floor`, :mod:`.assign_floor`);
* :mod:`.heartbeats` - ``dt bench heartbeats``: the orchestration;
* :mod:`.loadgen` - the closed-loop load generator (``python -m``, plain asyncio);
* :mod:`.floor` - the bare grpclib + asyncpg heartbeat server (``python -m``);
* :mod:`.database` - bench database, schema, table resets, the health-check
  statement timing;
* :mod:`.procs` - child processes, ports, CPU accounting, machine facts;
* :mod:`.report` - targets, the printed table and the JSON figures.
"""
