"""Whether `import glmtune.models` registers glmtune's own architectures (ChatGLM-6B, models/chatglm6b/) with
transformers' Auto classes.

It does by default: a directory `glmtune convert` or `glmtune merge` wrote then loads with AutoModelForCausalLM after
`import glmtune.models` (what those commands tell their users). Registering imports transformers' Auto classes, and
with them torch: 2-3 s and a few hundred MB before a command's first line. `glmtune plan` reads config.json files only
and never needs torch, so it first imports the model registry inside `config_only()`. glmtune's own loader
(glmtune.models.loading.load_model) registers before it loads, so a process that planned first still loads every
family; only a raw AutoModelForCausalLM call in such a process needs `glmtune.models.chatglm6b.register()` first."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

on_import = True  # read once, by glmtune/models/__init__.py, when the package is first imported


@contextmanager
def config_only() -> Iterator[None]:
    """Imports inside it that import glmtune.models for the first time leave transformers (and torch) unimported."""
    global on_import
    on_import = False
    try:
        yield
    finally:
        on_import = True
