"""The registered model's code file (MLflow models-from-code): MLflow runs this file when it loads the model, with
the model's own copy of the desctune package first on sys.path. Nothing is unpickled."""

from mlflow.models import set_model

from desctune.registry.pyfunc import DescTuneModel

set_model(DescTuneModel())
