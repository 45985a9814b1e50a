"""MLflow "models from code" entry of `uniloom-<kind>` (uniloom-mingtok, -unitok, -tuna):
MLflow executes this file to build the model when loading it, so loading the registered
model unpickles nothing; the weights file says which kind it is."""

import mlflow.models

from uniloom.pipelines.tokenizer.registry import TokenizerPyfunc

mlflow.models.set_model(TokenizerPyfunc())
