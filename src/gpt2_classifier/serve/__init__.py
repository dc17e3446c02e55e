"""Using a trained classifier: score texts (predict), the MLflow pyfunc model (logged_model,
pyfunc_entry) and the `gpt2-classifier` command (cli)."""
