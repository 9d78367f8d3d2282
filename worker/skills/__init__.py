"""The tools a step offers its model: the base tools run in-process (`base`, confined by `paths`), MCP skill
servers (`mcp/`), the step's view of them (`scope`), the environment children see (`envfilter`), and the
toolset that puts them together for one step (`toolset`)."""
