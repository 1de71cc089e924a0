"""What the runner does differently per task (`data.task`), in one object per task: the row
fields it reads and how it checks and encodes them, which models it trains, its loss terms,
which evals it reports and what it checks at the end. `lora-jax train` / `eval` / `compile`
look the task up in `TASKS` and never branch on it.

Tasks sit under the settings (which offer `TASKS`' names as `data.task`'s choices) and over
the data pipeline (an `Encoder` is the `data.RowEncoder` of a task and its settings): what
they read of the settings and of a run is described in `base`, as protocols (`DataFields`,
`Trained`), not imported. A task is a module of this package: `classify`, `sft`, `dpo`.
"""

from __future__ import annotations

from lora_jax.tasks.base import DataFields, Encoder, Task, Terms, Trained, template_fields
from lora_jax.tasks.classify import Classify
from lora_jax.tasks.dpo import Dpo, PreferenceFields
from lora_jax.tasks.sft import Sft

TASKS: dict[str, Task] = {task.name: task for task in (Classify(), Sft(), Dpo())}

__all__ = ["TASKS", "Classify", "DataFields", "Dpo", "Encoder", "PreferenceFields", "Sft", "Task",
           "Terms", "Trained", "template_fields"]  # fmt: skip
