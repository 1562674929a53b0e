"""Daily retraining on date-partitioned logs (``ray-pinet retrain``, ``ray-pinet partition``)."""
