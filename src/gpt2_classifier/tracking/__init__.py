"""MLflow: one run per finetune continued by evaluate (runs), the lineage of what a run read and
wrote, and a new mlflow.db copied from an empty store (store)."""
