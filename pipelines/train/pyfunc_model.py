"""MLflow "models from code" entry of `uniloom-univision`: MLflow executes this file to
build the model when loading it, so loading the registered model unpickles nothing."""

import mlflow.models

from uniloom.pipelines.train.registry import UniVisionPyfunc

mlflow.models.set_model(UniVisionPyfunc())
