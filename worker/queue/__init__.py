"""The worker side of the queue, the one room of the worker that imports arq.

- `worker.py`: arq's Worker running perq's steps (the poll loop, pick-up, wake-up, back-off) and `serve`;
- `leases.py`: taking ready steps and renewing their leases;
- `steps.py`: what a running step asks of Redis (cancel check, journaled answers, the hand-over);
- `scripts.py` and the `.lua` files: the Lua those need, registered once;
- `arq_private.py`: what perq relies on of arq beyond its documented API, checked at start-up and by test.

The contract with the producer (task names, payloads, keys, enqueueing) is `shared/queue/`.
"""
