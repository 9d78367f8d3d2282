"""`perq cancel`: stop a queued or running job before its next step (the API's `Client.cancel`)."""

from __future__ import annotations

from typing import Annotated

import typer

from producer.cli.exit import exits_on_refusal


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Stop a queued or running job (and its delegates) before its next step."""
    import asyncio

    from producer.api import Client
    from producer.views import report

    async def go() -> None:
        async with Client() as client:
            with exits_on_refusal():
                job = await client.cancel(job_id)
            report.cancelled(job, json_output=json_output)

    asyncio.run(go())
