"""How the CLI shows things on a terminal (rich) and as JSON: status, logs, the queue, views kept current."""
