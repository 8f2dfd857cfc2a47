"""Fixtures of the reliability tests.

The CLI helpers and tiny setups they share with ``tests/dse`` are defined once, in ``tests/dse/conftest.py``,
and made visible here by importing the fixtures (a conftest's fixtures reach only its own folder): their
right home is ``tests/conftest.py``, which both folders see.
"""

from tests.dse.conftest import (  # noqa: F401  (fixtures)
    costs_for,
    expected_objectives,
    finetune_cli_args,
    kill_process,
    run_cli,
    search_cli_settings,
    spawn_dse,
    tiny_cfg,
    tiny_checkpoint,
    tiny_profile_model,
    tiny_profile_set,
    write_cost_table,
)
