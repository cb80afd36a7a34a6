"""The bus: the one package that imports aio-pika.

Every reliability setting lives here, once: durable objects, persistent delivery, publisher
confirms with ``mandatory`` (an unroutable message is an error, never silence), ``user_id`` on
every publish, a timeout on every publish (a blocked broker gives an error, not a hang),
validation before a handler runs, ack only after the handler returns, and dead-lettering with a
reason instead of requeueing forever. Read it a module at a time:

- ``errors``: what callers and handlers see (``Refused``, ``RpcFailure``, the sender guard);
  it imports no aio-pika, and neither does this file, so handlers import it without the
  messaging library;
- ``connection``: one URL or a cluster's nodes, the first connection retried with backoff;
- ``publish``: confirms, returns, deadlines (with ``deadlines``);
- ``consume``: validation, acks after the effect (with ``acks``), retries, dead letters;
- ``rpc``: request/reply, server and client;
- ``queues``: declaring the topology and asking the broker about queues;
- ``shutdown``: stopping with handlers in flight;
- ``rabbit_bus``: ``RabbitBus``, the small facade a process holds.
"""
