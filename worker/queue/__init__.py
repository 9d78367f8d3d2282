"""The worker side of the queue, the one room of the worker that imports arq.

- `worker.py`: arq's Worker with perq's poll loop (pick-up, wake-up, back-off), running each step itself
  with arq's semantics (try counter, Retry, max tries, finish), and `serve`;
- `leases.py`: taking ready steps (with their jobs and tries) and renewing their leases;
- `steps.py`: what a running step asks of Redis (cancel check, journaled answers, the hand-over, which
  finishes the step too);
- `batch.py`: the Redis calls of the worker's running steps sent together, one pipeline per batch;
- `scripts.py` and the `.lua` files: the Lua those need, registered once;
- `arq_private.py`: what perq relies on of arq beyond its documented API, checked at start-up and by test.

The contract with the producer (task names, payloads, keys, enqueueing) is `shared/queue/`.
"""
