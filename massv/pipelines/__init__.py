"""Pipelines: jobs that *use* the MASSV library, the way any user would, through its public names.

`demo` (`massv demo`: the whole pipeline on the synthetic world, with a report), `compression_study`
(`massv demo --compress`: MAL vs MACs of pruned / sparse drafters), `world` (the synthetic visual world),
`world_cli` (`massv world`: write its splits) and `world_models` (train, ship and load the world's target
VLM and text-only LM). Nothing under `massv/` outside this package imports it, except the CLI, which
dispatches a subcommand here lazily; tests/test_layout.py walks the import graph to keep it that way.
"""
