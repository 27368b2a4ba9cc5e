"""Thin Hydra entry points: compose, call a job. Importing this package registers the config resolvers
(`qat.jobs.config.register_resolvers`)."""
from qat.jobs.config import register_resolvers

register_resolvers()
