"""MLflow "models from code" entry of `uniloom-mingtok`: MLflow executes this file to
build the model when loading it, so loading the registered model unpickles nothing."""

import mlflow.models

from uniloom.pipelines.tokenizer.registry import MingTokPyfunc

mlflow.models.set_model(MingTokPyfunc())
