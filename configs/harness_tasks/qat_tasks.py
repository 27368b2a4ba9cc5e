"""lm-eval's hooks for qat's offline tasks (the YAMLs beside this file name them with `!function`); the logic
lives in qat.jobs.offline_tasks."""
from qat.jobs.offline_tasks import load_task_dataset, wikitext_results


def load(qat_task: str, **metadata):
    """`custom_dataset`: the task's documents, built from the local corpus (see qat.jobs.offline_tasks)."""
    return load_task_dataset(qat_task, **metadata)


process_results = wikitext_results
