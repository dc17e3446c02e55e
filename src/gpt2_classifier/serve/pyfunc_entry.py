"""The logged classifier's code, as MLflow's models-from-code loads it: `log_classifier` records this
file rather than a pickled Python object, and loading the model runs it (see logged_model.py)."""

from mlflow.models import set_model

from gpt2_classifier.serve.pyfunc_model import ClassifierModel

set_model(ClassifierModel())
