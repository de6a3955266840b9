"""Pure decisions and data: clustering, the batching pipeline, the work queue, names, errors."""
