"""The models a step can call: the contract (`contract`), its providers (`script`, `pydantic_ai`), and the
choice between them (`select`)."""
