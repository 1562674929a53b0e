"""MLflow: runs, metrics and artifacts (``mlflow_utils``), the Model Registry and its @champion
alias (``registry``), and the plots logged with runs (``plots``). MLflow is imported lazily
inside the functions that call it."""
