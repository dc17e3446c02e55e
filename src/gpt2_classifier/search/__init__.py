"""`gpt2-classifier search`: a hyperparameter search on Optuna whose trials are DVC experiments (space: the
search file; study: the search and its workers; trial: what a trial's finetune reports to its study)."""
