"""The application layer: the jobs behind the CLIs (ptq, compare, sweep, export, eval), what they measure
(`measure`), their rows and tables (`results`) and their config schemas (`config`).

Jobs take plain dicts (a composed Hydra config, resolved), so tests call them without Hydra. Layering:
`cli -> lit -> jobs -> {export, ptq, transform} -> ...`; jobs import no Lightning (QAT rows of a sweep run
through a callable the CLI passes in).
"""
