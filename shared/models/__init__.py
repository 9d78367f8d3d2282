"""Every schema perq writes or reads, one module per kind: the base, ids and usage (`core`), messages
(`messages`), experts and skills (`experts`), what the store keeps (`records`), events (`events`).

Field names in JSON are Perstack's camelCase ones, so a Perstack checkpoint loads here and a perq checkpoint
carries every field Perstack requires. Python code uses snake_case attributes. Everything is importable from
`shared.models` itself.
"""

# Every public name of each kind's module, so that `from shared.models import X` serves for any of them; a
# list here would repeat each module's contents and fall behind it.
from shared.models.core import *  # noqa: F403
from shared.models.events import *  # noqa: F403
from shared.models.experts import *  # noqa: F403
from shared.models.messages import *  # noqa: F403
from shared.models.records import *  # noqa: F403
