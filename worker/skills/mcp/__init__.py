"""MCP skill servers: how to reach one (`launch`), one connected server (`session`), the servers a worker
keeps across steps (`pool`), and MCP's shapes turned into perq's (`convert`)."""
