"""What the tests and the benchmarks share: an importable package, never a test module.

- ``ports``: free ports, each pytest-xdist worker from a block of its own;
- ``services``: the broker and Redis the run uses, a vhost and database per session or test,
  moto's server as the AWS endpoint;
- ``polling``: ``eventually``, a bounded poll instead of a sleep;
- ``broker``: raw publishes and reads that bypass the bus (bodies it would never send);
- ``processes``: whole processes (services, agents, substratectl), stopped by process id;
- ``cells``: creating cells, their agents and bootstrap stacks, and speaking as a cell;
- ``fleet``: cells with running agents through a rollout, and the operator's commands;
- ``nodes``: private RabbitMQ, Redis and Sentinel nodes a test may kill, pause or restart;
- ``proxy``: a TCP proxy between an agent and the broker that a test turns bad;
- ``ledger``: what every fault test ends with (each confirmed command applied once);
- ``simulator``: thousands of simulated cells in worker processes, for benchmarks and the
  cluster fault test.
"""
