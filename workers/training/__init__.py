"""The training side of a trial: the loop (one function of a TrainConfig), its DeepSpeed glue and chain
steps, and the Ray Train entry that calls it."""
